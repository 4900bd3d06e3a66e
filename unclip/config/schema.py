"""Typed configuration: the dataclass schemas every Hydra YAML is validated against.

Each YAML file starts its defaults list with one of the schema names registered in :func:`register_configs`,
so a misspelt key or a value of the wrong type fails while Hydra composes the config — before any work —
with a message that names the key. Cross-field rules that a type cannot express live in :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from unclip.data import shapes
from unclip.errors import ConfigError
from unclip.precision import PRECISION_CHOICES

# --------------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Where captioned images come from. ``source`` picks the reader in :mod:`unclip.data.sources`."""

    source: str = MISSING
    cache_dir: str | None = None  # null: $UNCLIP_CACHE, else ~/.cache/unclip
    # keep a cached split's decoded pixels in memory when they fit in this many MiB (0: decode every read)
    decoded_cache_mb: int = 1024


@dataclass
class ShapesDataConfig(DataConfig):
    """The embedded procedural dataset (DESIGN §4): no download, the truth behind every image known."""

    source: str = "shapes"
    seed: int = 0
    train_size: int = 20000
    eval_size: int = 500
    # (colour, shape) pairs never drawn in train; eval_holdout measures compositional generalisation
    holdout: list[list[str]] = field(default_factory=lambda: [list(pair) for pair in shapes.DEFAULT_HOLDOUT])


@dataclass
class ImageDataConfig(DataConfig):
    """What every source of the user's own captioned images shares (``folder``, ``parquet``, ``webdataset``).

    Their ``eval`` split holds out the samples whose key hashes under ``eval_fraction`` (so a growing dataset
    keeps its eval rows and train never sees them) and evaluates at most ``eval_size`` of them; an explicit
    eval source (``eval_path`` / ``eval_urls``) replaces the hold-out.
    """

    eval_fraction: float = 0.05
    eval_size: int = 500
    # decompression-bomb limit, checked before decoding (Pillow's default); a larger image is skipped and
    # counted. Pillow by itself still refuses more than twice its own global limit.
    max_image_pixels: int = 89_478_485
    min_image_size: int = 16  # an image with a shorter side is skipped and counted


@dataclass
class FolderDataConfig(ImageDataConfig):
    """A folder (searched recursively) of images with ``metadata.jsonl``/``.csv`` or same-name ``.txt``."""

    source: str = "folder"
    path: str = MISSING
    captions: str = "auto"  # auto (metadata file if there is one, else .txt) | metadata | txt
    caption_column: str | None = None  # metadata column; null: the first of caption, text
    eval_path: str | None = None  # a folder laid out the same way, used as the eval split


@dataclass
class ParquetDataConfig(ImageDataConfig):
    """Parquet file(s): ``path`` is a file, a folder or a glob; an image cell is bytes, a {bytes, path}
    struct or a path relative to its parquet file."""

    source: str = "parquet"
    path: str = MISSING
    image_column: str = "image"
    caption_column: str | None = None  # null: the first of caption, text
    key_column: str | None = None  # a column of stable sample ids; null: <file stem>-<row number>
    eval_path: str | None = None  # parquet file(s) used as the eval split


@dataclass
class WebDatasetDataConfig(ImageDataConfig):
    """Tar shards (WebDataset layout: <key>.jpg|jpeg|png|webp + <key>.txt|json), local paths or URLs, with
    brace ranges ({00000..00099}) and globs."""

    source: str = "webdataset"
    urls: list[str] = MISSING
    eval_urls: list[str] = field(default_factory=list)  # shards used as the eval split; []: hash hold-out
    caption_key: str = "txt"  # txt, or json.<field> (json.a.b for a nested field)
    streaming: bool = True  # false: the train split is materialised into the cache like a folder
    shuffle_buffer: int = 1000  # streamed examples (still compressed) shuffled in a buffer; 0: no shuffling
    crop: str = "center"  # center | random (streamed train only; materialised splits are centre-cropped)


# --------------------------------------------------------------------------------------------------- models


@dataclass
class ClipModelConfig:
    """An open_clip model: a built-in architecture by ``name`` or an explicit ``arch`` (open_clip model cfg).

    ``pretrained`` is an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...), a local checkpoint
    file, or null for random initialisation.
    """

    name: str = MISSING
    pretrained: str | None = None
    arch: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------------- stages


@dataclass
class StageConfig:
    """What every stage shares; each stage extends it with its own fields."""

    name: str = MISSING


@dataclass
class ClipStageConfig(StageConfig):
    """Contrastive CLIP training (Radford et al. 2021) with open_clip's loss."""

    name: str = "clip"
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    # held-out images per eval split for the zero-shot evaluation
    eval_images: int = 500


@dataclass
class PriorModelConfig:
    """The prior transformer: a ``PriorConfig.preset`` (``tiny`` | ``paper``), each field null = the preset's.

    D, the text-token width and the caption length come from the CLIP the prior is trained against.
    """

    preset: str = "tiny"
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    dropout: float | None = None


@dataclass
class PriorSamplingConfig:
    """How the prior samples (unCLIP §2.2): sampler, steps (``space_timesteps`` spec), guidance, best-of-n."""

    sampler: str = "ddim"
    steps: str = "64"
    eta: float = 0.0
    guidance_scale: float = 2.0
    candidates: int = 2


@dataclass
class PrecomputedEmbeddings:
    """Train on the parquet parts of an ``unclip-embed`` job (:mod:`unclip.embed`) instead of embedding
    ``data`` on the fly; ``stream`` reads them part by part (a shuffle buffer of ``shuffle_buffer`` rows)."""

    path: str | None = None
    stream: bool = False
    shuffle_buffer: int = 10000


@dataclass
class PriorStageConfig(StageConfig):
    """The diffusion prior (unCLIP §2.2): text -> CLIP image embedding, trained on cached CLIP embeddings."""

    name: str = "prior"
    clip: str = MISSING  # a CLIP component folder (a CLIP run's export/)
    embeddings: PrecomputedEmbeddings = field(default_factory=PrecomputedEmbeddings)
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    normalize: str = "zscore"  # zscore | unit_scale
    schedule: str = "cosine"
    num_timesteps: int = 1000
    caption_drop: float = 0.1
    sampling: PriorSamplingConfig = field(default_factory=PriorSamplingConfig)
    # eval captions per eval split
    eval_captions: int = 500


@dataclass
class DecoderUNetOverrides:
    """Fields of the decoder's U-Net (:class:`unclip.models.unet.UNetConfig`); null keeps the preset's.
    ``context_dim`` follows the caption transformer's width and ``learn_sigma`` the diffusion's variance."""

    model_channels: int | None = None
    channel_mult: list[int] | None = None
    num_res_blocks: int | None = None
    attention_downsample: list[int] | None = None
    num_head_channels: int | None = None
    dropout: float | None = None
    stem_factor: int | None = None
    num_groups: int | None = None
    use_checkpoint: bool | None = None
    output_norm: bool | None = None


@dataclass
class DecoderTextOverrides:
    """Fields of GLIDE's caption transformer; null keeps the preset's (the caption length is CLIP's)."""

    width: int | None = None
    layers: int | None = None
    heads: int | None = None


@dataclass
class DecoderModelConfig:
    """The decoder: a preset of :mod:`unclip.models.decoder` (``tiny`` | ``paper``) and field overrides."""

    preset: str = "tiny"
    unet: DecoderUNetOverrides = field(default_factory=DecoderUNetOverrides)
    text: DecoderTextOverrides = field(default_factory=DecoderTextOverrides)
    num_clip_tokens: int | None = None  # extra context tokens made from the CLIP embedding (4 in §2.1)


@dataclass
class DecoderSamplingConfig:
    """How the decoder samples: sampler, steps (``space_timesteps`` spec), DDIM eta, guidance scale."""

    sampler: str = "ddim"
    steps: str = "15"  # the few-step table in recipes/sweeps/README.md
    eta: float = 0.0
    guidance_scale: float = 3.0


@dataclass
class DecoderStageConfig(StageConfig):
    """The decoder (unCLIP §2.1): CLIP image embedding + caption -> 64 px image, on cached embeddings."""

    name: str = "decoder"
    clip: str = MISSING  # a CLIP component folder (a CLIP run's export/)
    embeddings: PrecomputedEmbeddings = field(default_factory=PrecomputedEmbeddings)
    image_size: int = 64
    model: DecoderModelConfig = field(default_factory=DecoderModelConfig)
    schedule: str = "cosine"
    schedule_shift: float = 4.0
    num_timesteps: int = 1000
    prediction: str = "x0"  # eps | x0 | v
    variance: str = "learned"  # learned | fixed_small | fixed_large
    loss_weighting: str = "none"  # none | min_snr
    image_embedding_drop: float = 0.1
    caption_drop: float = 0.5
    edge_loss_weight: float = 0.0  # > 0: more loss near edges (unclip.diffusion.gaussian.edge_emphasis)
    sampling: DecoderSamplingConfig = field(default_factory=DecoderSamplingConfig)
    # held-out images decoded per eval split, with their captions and (if set) without
    eval_images: int = 100
    eval_without_caption: bool = True


@dataclass
class UpsamplerUNetOverrides:
    """Fields of an upsampler's U-Net (:class:`unclip.models.unet.UNetConfig`); null keeps the preset's.
    Upsamplers are convolution-only: no attention, no context."""

    model_channels: int | None = None
    channel_mult: list[int] | None = None
    num_res_blocks: int | None = None
    dropout: float | None = None
    stem_factor: int | None = None
    num_groups: int | None = None
    use_checkpoint: bool | None = None


@dataclass
class UpsamplerModelConfig:
    """An upsampler: a preset of :mod:`unclip.models.upsampler` (``sr256_tiny`` | ``sr256_paper`` |
    ``sr1024_tiny`` | ``sr1024_paper``) and field overrides."""

    preset: str = "sr256_tiny"
    unet: UpsamplerUNetOverrides = field(default_factory=UpsamplerUNetOverrides)


@dataclass
class UpsamplerSamplingConfig:
    """How an upsampler samples: sampler, steps, DDIM eta, the fixed noise-augmentation level of the
    condition, tiling (``tile_size`` 0: the whole image at once), and whether every x_0 estimate is made
    consistent with the input (:func:`unclip.upsampler_sampling.back_project`)."""

    sampler: str = "ddim"
    steps: str = "27"
    eta: float = 0.0
    aug_level: float = 0.0
    tile_size: int = 0
    tile_overlap: int = 32
    consistent: bool = True


@dataclass
class UpsamplerStageConfig(StageConfig):
    """A diffusion upsampler (unCLIP §2.1, App. C): low-res image -> ``scale`` x larger image, trained on
    random crops of ``crop_fraction`` of the side."""

    name: str = "sr256"
    image_size: int = 256
    low_res_size: int = 64
    crop_fraction: float = 0.25
    edge_crop_fraction: float = 0.0  # this share of the crops is centred on a random pixel with detail
    model: UpsamplerModelConfig = field(default_factory=UpsamplerModelConfig)
    schedule: str = "cosine"
    schedule_shift: float = 1.0
    num_timesteps: int = 1000
    prediction: str = "x0"  # eps | x0 | v
    residual: bool = True  # x0 is predicted as the resized low-res image plus the network's output
    variance: str = "fixed_small"  # learned | fixed_small | fixed_large
    loss_weighting: str = "none"  # none | min_snr
    degradation: str = "blur"  # none | blur | bsr: corruption of the condition in training
    degradation_probability: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.4, 0.6])
    noise_aug_max: float = 0.0  # > 0: noise-augment the condition to a level in [0, this] (the model is told)
    sampling: UpsamplerSamplingConfig = field(default_factory=UpsamplerSamplingConfig)
    eval_images: int = 16  # held-out images upsampled per eval split
    eval_batch_size: int = 8


# --------------------------------------------------------------------------------------------------- training


@dataclass
class OptimConfig:
    """AdamW with linear warmup then a cosine (or constant) schedule."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class TrainerConfig:
    """The one training loop's knobs (see :mod:`unclip.train.trainer`)."""

    max_steps: int = 1000
    batch_size: int = 64  # global batch per optimizer step, across processes and accumulation
    grad_accum: int = 1
    precision: str = "no"  # no | auto | fp16 | bf16 (auto: bf16 only where faster, see unclip.precision)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only when training ends
    log_every: int = 10
    num_workers: int = 0
    # streamed data: how many streams make up a global batch (0: processes x workers); keep it fixed to get
    # the same batches, and weights, from any number of processes
    streams: int = 0
    cpu: bool = False  # force the CPU even where a GPU is present
    # torch.compile the model in place (checkpoints and exports unchanged); on the CPU it needs a C++ compiler
    # and Python's headers (checked before any work)
    compile: bool = False
    progress: bool = True


@dataclass
class LoggerConfig:
    """Experiment tracking through Accelerate's trackers: ``wandb`` (offline by default) or ``none``."""

    kind: str = "wandb"
    project: str = "unclip"
    mode: str = "offline"


@dataclass
class TrainConfig:
    """Root of ``unclip-train``."""

    stage: Any = MISSING
    data: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    # a run directory or checkpoint directory to continue from; "latest" = this run's newest checkpoint
    resume: str | None = None
    debug: bool = False


@dataclass
class PriorOverrides:
    """Overrides of the prior's exported sampling settings; null keeps the exported value."""

    sampler: str | None = None
    steps: str | None = None  # a space_timesteps spec: "32", "ddim50", "10,10,3"
    guidance_scale: float | None = None
    candidates: int | None = None


@dataclass
class DecoderOverrides:
    """Overrides of the decoder's exported sampling settings; null keeps the exported value."""

    sampler: str | None = None
    steps: str | None = None
    eta: float | None = None
    guidance_scale: float | None = None


@dataclass
class UpsamplerOverrides:
    """Overrides of an upsampler's exported sampling settings; null keeps the exported value."""

    sampler: str | None = None
    steps: str | None = None
    eta: float | None = None
    aug_level: float | None = None
    tile_size: int | None = None  # 0: the whole image at once
    tile_overlap: int | None = None
    consistent: bool | None = None


@dataclass
class SampleConfig:
    """Root of ``unclip-sample``."""

    pipeline: str = MISSING
    prompt: str | None = None
    prompts_file: str | None = None
    negative_prompt: str | None = None  # guidance away from this caption, in the prior and the decoder
    out: str = "samples"
    num_images: int = 1
    seed: int = 0
    size: int | None = None  # stop the cascade at this side (64, 256, 1024); null: the pipeline's largest
    device: str = "cpu"
    # auto | no | bf16 | fp16: autocast while sampling; auto: bf16 only where faster (unclip.precision)
    precision: str = "auto"
    prior: PriorOverrides = field(default_factory=PriorOverrides)
    decoder: DecoderOverrides = field(default_factory=DecoderOverrides)
    sr256: UpsamplerOverrides = field(default_factory=UpsamplerOverrides)
    sr1024: UpsamplerOverrides = field(default_factory=UpsamplerOverrides)
    # image variation: decode num_images variations of this file (prompt= optionally captions them)
    image: str | None = None
    invert: bool = False  # start from the image's DDIM-inverted noise; decoder.eta sets how far they stray
    # interpolation (unCLIP Figure 4): num_images steps between two images' CLIP embeddings
    interpolate: list[str] | None = None
    # text diff (unCLIP Figure 5): move image= from its caption prompt= toward this one
    text_diff: str | None = None
    text_diff_max: float = 0.5  # the largest slerp angle, as a fraction of the way to the diff vector
    grid: bool = True  # also write grid.png, one row per prompt
    progress: bool = True
    debug: bool = False


@dataclass
class PipelineEvalConfig:
    """Root of ``unclip-eval pipeline=...``: the cascade judged on the ``shapes`` eval captions."""

    pipeline: str = MISSING
    data: ShapesDataConfig = field(default_factory=ShapesDataConfig)
    captions: int = 100  # captions per eval split (seen pairs, held-out pairs)
    seed: int = 0
    batch_size: int = 50
    device: str = "cpu"
    precision: str = "no"  # no | auto | bf16 | fp16: autocast while sampling (fp32 by default: comparable)
    prior: PriorOverrides = field(default_factory=PriorOverrides)
    decoder: DecoderOverrides = field(default_factory=DecoderOverrides)
    grid_images: int = 16  # samples shown in the report's grid
    out: str | None = None  # report folder; null: Hydra's job folder (one per job of a -m sweep)
    progress: bool = True
    debug: bool = False


STAGE_SCHEMAS: dict[str, type[StageConfig]] = {
    "clip": ClipStageConfig,
    "prior": PriorStageConfig,
    "decoder": DecoderStageConfig,
    "sr256": UpsamplerStageConfig,
    "sr1024": UpsamplerStageConfig,
}
DATA_SCHEMAS: dict[str, type[DataConfig]] = {
    "shapes": ShapesDataConfig,
    "folder": FolderDataConfig,
    "parquet": ParquetDataConfig,
    "webdataset": WebDatasetDataConfig,
}


@dataclass
class EmbedConfig:
    """``unclip-embed``: CLIP embeddings of a whole source as parquet parts (:mod:`unclip.embed`)."""

    data: Any = MISSING
    clip: str = MISSING
    out: str = MISSING
    batch_size: int = 256
    image_size: int | None = 64
    rows_per_part: int = 10000
    parts: int = 8
    cpu: bool = False
    progress: bool = True
    debug: bool = False


def register_configs() -> None:
    """Register the schemas under the names the YAML defaults lists refer to (``schema_<name>``)."""
    cs = ConfigStore.instance()
    cs.store(name="schema_train", node=TrainConfig)
    cs.store(name="schema_sample", node=SampleConfig)
    cs.store(name="schema_evaluate", node=PipelineEvalConfig)
    cs.store(name="schema_embed", node=EmbedConfig)
    for name, node in STAGE_SCHEMAS.items():
        cs.store(group="stage", name=f"schema_{name}", node=node)
    for name, node in DATA_SCHEMAS.items():
        cs.store(group="data", name=f"schema_{name}", node=node)
    cs.store(group="clip_model", name="schema_clip_model", node=ClipModelConfig)


_SCHEDULES = ("cosine", "constant")
_LOGGERS = ("wandb", "none")


def validate(cfg: DictConfig) -> None:
    """Check the rules a type cannot express; raise :class:`ConfigError` naming the key."""
    if OmegaConf.is_missing(cfg, "stage") or OmegaConf.is_missing(cfg.stage, "name"):
        raise ConfigError(f"no stage chosen: add stage=<{'|'.join(STAGE_SCHEMAS)}>")
    if cfg.stage.name not in STAGE_SCHEMAS:
        raise ConfigError(f"stage.name={cfg.stage.name!r} is not one of {sorted(STAGE_SCHEMAS)}")
    if OmegaConf.is_missing(cfg, "data"):
        raise ConfigError(f"no data source chosen: add data=<{'|'.join(DATA_SCHEMAS)}>")
    t = cfg.trainer
    checks = [
        (
            t.precision in PRECISION_CHOICES,
            f"trainer.precision={t.precision!r} must be one of {list(PRECISION_CHOICES)}",
        ),
        (
            cfg.optim.schedule in _SCHEDULES,
            f"optim.schedule={cfg.optim.schedule!r} must be one of {_SCHEDULES}",
        ),
        (cfg.logger.kind in _LOGGERS, f"logger.kind={cfg.logger.kind!r} must be one of {_LOGGERS}"),
        (t.max_steps > 0, f"trainer.max_steps={t.max_steps} must be positive"),
        (t.grad_accum > 0, f"trainer.grad_accum={t.grad_accum} must be positive"),
        (
            t.batch_size % t.grad_accum == 0,
            f"trainer.batch_size={t.batch_size} must be divisible by trainer.grad_accum={t.grad_accum}",
        ),
        (0.0 <= t.ema_decay < 1.0, f"trainer.ema_decay={t.ema_decay} must be in [0, 1)"),
        (t.checkpoint_every > 0, f"trainer.checkpoint_every={t.checkpoint_every} must be positive"),
        (t.keep_checkpoints > 0, f"trainer.keep_checkpoints={t.keep_checkpoints} must be positive"),
        (cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be positive"),
        (len(cfg.optim.betas) == 2, f"optim.betas={list(cfg.optim.betas)} must have two entries"),
        (
            cfg.data.decoded_cache_mb >= 0,
            f"data.decoded_cache_mb={cfg.data.decoded_cache_mb} must be 0 (off) or a size in MiB",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
