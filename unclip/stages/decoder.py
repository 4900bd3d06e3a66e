"""The decoder stage (unCLIP §2.1): learn p(x | z_i, y), images from CLIP image embeddings and captions.

The decoder is trained against one frozen CLIP, given as a component folder (``stage.clip``, what the CLIP
stage exports). ``prepare_data`` renders every split at ``stage.image_size`` and embeds it once through that
CLIP (:func:`unclip.clip.cache.embed_split`, cached on disk under the CLIP's fingerprint; the embedding is of
the very image the decoder learns to draw). Training then never runs CLIP: each step reads pixels, the cached
image embedding and the caption's CLIP token ids, which GLIDE's caption transformer inside the decoder
encodes. Evaluation decodes the true embeddings of held-out images (:mod:`unclip.eval.decoder_eval`); export
writes the decoder's component folder, which records the CLIP fingerprint so it is never paired with another
CLIP.

Defaults that differ from the paper's (eps prediction, no shift), chosen by measurement on ``shapes`` (tiny
preset, 64 px, batch 32, lr 1e-3, tiny_convnet CLIP of the CLIP recipe; two runs side by side on one core
each; evaluation on 50 held-out images of seen pairs, guided DDIM 25 at scale 3):

    prediction / weighting   shift  steps  colour  position  CLIP cosine  samples
    v / min-SNR              1      700    0.44    0.08      0.16         blobs under heavy pixel noise
    v / min-SNR              2      700    0.56    0.14      0.17         blobs under heavy pixel noise
    v / none                 2      420    0.68    0.10      0.25         blobs under pixel noise
    x0 / none                1      420    0.10    0.02      0.16         flat backgrounds, few objects
    x0 / none                2      420    0.26    0.04      0.44         clean; objects often missing
    x0 / none (default)      4      420    0.46    0.14      0.57         clean blobs in the right places

Our reading, not separately measured: through the 4 x 4 stem the network predicts 16 pixels per output
position, where a clean, flat x0 is easy to draw and per-pixel noise (what eps and, at low noise, v must
predict) is hard; min-SNR weighting also gives the low-noise steps little weight. The recipe
(``experiment=shapes_decoder``, 1300 steps, 21 min of training on 2 cores) then gives, on 100 held-out images
per split, with captions (without: within 0.05):

    minutes  seen pairs: colour shape position cosine   held-out pairs: colour shape position cosine
    5.2      0.41  0.17  0.11  0.55                     0.36  0.22  0.12  0.54
    10.5     0.75  0.26  0.38  0.76                     0.86  0.29  0.29  0.78
    16.0     0.88  0.25  0.55  0.79                     0.91  0.30  0.50  0.82
    21.0     0.77  0.24  0.56  0.78                     0.87  0.27  0.56  0.80
    40*      0.79  0.23  0.61  0.82                     0.80  0.22  0.56  0.81

(* resumed from the 21-minute run for 1300 more steps with max_steps=2600, so its cosine learning rate
restarted at 5.4e-4.) Shuffled-pairs CLIP cosine: 0.00 on seen and 0.07 on held-out pairs. Colour, size and
position are learnt from the CLIP embedding; shape is not: every object is drawn as a round blob, and the
caption, which names the shape, is ignored -- the denoising error is the same with the caption dropped. The
CLIP embedding itself holds little shape (an MLP probe trained on the training split's embeddings reads shape
at 0.84 on seen and 0.23 on held-out pairs).

With the later CLIP recipe, whose embeddings hold shape (a linear probe: 0.98 seen, 0.91 held out) but less
position (0.30 against 0.61), the same decoder recipe (21 min of training, 23 min for the command) gives, on
100 held-out images per split with captions: colour 0.88 / 0.91, shape 0.25 / 0.25, position 0.11 / 0.09,
size 0.74 / 0.79, CLIP cosine 0.59 / 0.62 (shuffled -0.05 / 0.03). The objects are still soft round blobs,
with DDIM 15 and with ancestral DDPM 250 alike, so the shape the embedding carries is not drawn. A 2 x 2 stem
with 24/48/48 channels and attention at 16 and 8 px (1.4 s a step against 0.9 s) reached, at step 650 (50
images per split): colour 0.88 / 0.80, shape 0.30 / 0.22, cosine 0.64 / 0.70, against 0.70 / 0.82, 0.20 /
0.30, 0.51 / 0.61 for the default at the same step: a little more per step, shape still at chance.

Where the shape is lost. The evaluation also reports :func:`~unclip.eval.decoder_eval.denoising_profile`:
the error of the decoder's one-step x_0 estimate from the true image noised to t, beside the error of the
noisy image itself. For the recipe's settings stopped at 650 steps (6.5 min of training; colour 0.82 / 0.84,
shape 0.26 / 0.34 on 50 images per split), seen pairs, T = 1000, logSNR shift 4:

    t                       0        50       150      300      599
    decoder's x_0 error     0.0205   0.0184   0.0190   0.0213   0.0297
    noisy input's error     0.0007   0.133    1.02     4.37     30.8

The decoder cannot reproduce even a clean image (t = 0): its estimate is a blur of about 3 px, the same at
every low noise level, and starting DDIM from the true image noised to t = 150 (logSNR 0, where the shape
is plain to see) draws shape no better than from pure noise (0.29 on 48 images). So the blobs are not a
failure to choose a shape at high noise but the network's inability, at this point of training, to draw
detail at all. Learning the near-identity map through the 4 x 4 stem (48 values per 4 x 4 cell into 48
channels and back) is slow: the tiny U-Net trained only to restore lightly noised renders (t < 100, batch
32, lr 1e-3) reaches x_0 error 0.011 after 150 steps and 0.0064 after 300. Tried at 650 steps of the
recipe, none better: truncated-SNR weighting of the x_0 error, clamp(SNR, 1, 20) (colour 0.60 / 0.62, shape
0.26 / 0.28, x_0 still blurred at t = 50); a full-resolution output head that mixes the noisy input into the
pixel-shuffled features (16 channels, two 3 x 3 convolutions, 19 % slower: colour 0.48 / 0.46, shape 0.26 /
0.16, x_0 error 0.023 at t = 0). On the restoring task alone: 96 channels at the first level 0.009 after 150
steps, 1.7x slower; lr 3e-3 0.013. Also measured (50 images per split, seen / held-out pairs):

    run                                          x_0 error at t = 0   colour       shape        training
    recipe, 650 (above)                          0.0205 / 0.0174      0.82 / 0.84  0.26 / 0.34  6:30
    recipe, 1300                                 0.0189 / 0.0176      0.86 / 0.88  0.30 / 0.24  12:14
    2 x 2 stem, 24/48/48, attention 16 and 8 px  0.0134 / 0.0117      0.76 / 0.60  0.34 / 0.18  7:56
    identity path: x_t added to the output
      through a gate from the timestep embedding 0.0159 / 0.0146      0.56 / 0.66  0.22 / 0.20  5:59

The last two ran 650 steps; the identity path was removed again. Training times vary by up to 15 % with
the host's speed. The error falls slowly with training, faster with the 2 x 2 stem, but none of these
draws shape yet.

The output GroupNorm. ADM normalises the last features before the output convolution, which removes each
image's mean and scale per channel group; an x_0 target of flat colours has to rebuild its absolute levels
past that. Screened with the stage's own loss (batch 32, lr 1e-3, EMA 0.99, 64 seen-pair images; x_0 error
at t = 50 / 150 / 300 / 599 after 500 steps):

    4 x 4 stem, 48/96/96 (the old preset)              0.0211  0.0211  0.0229  0.0321
    ... without the output GroupNorm                   0.0160  0.0172  0.0200  0.0302
    ... and 64 channels at the first level (400 steps)  0.0168  0.0188  0.0223  0.0334
    ... and half of each batch at t < 150               0.0134  0.0175  0.0238  0.0399
    2 x 2 stem, 24/48/48, without the output GroupNorm  0.0132  0.0138  0.0165  0.0283

The last is the tiny preset now. The recipe with it (1300 steps, 12:28 of training on a host where the old
preset's took 12:14; 50 images per split, seen / held-out pairs) against the old preset's, above:

    run                x_0 error at t = 0 / 50 / 150 / 300 / 599        colour       shape        cosine
    old preset, 1300   0.0189  0.0139  0.0146  0.0170  0.0258           0.86 / 0.88  0.30 / 0.24  0.56 / 0.63
    tiny preset, 1300  0.0100  0.0096  0.0108  0.0134  0.0220           0.92 / 0.90  0.32 / 0.22  0.66 / 0.70

(shuffled-pairs cosine -0.07 / 0.06 and -0.03 / 0.08.) Colour now clears 0.90 and the estimates are
sharper, but the decoder still draws a small star or square as a round dot, even from the clean image:
reading the one-step x_0 estimate of the true image at t = 0, 10, 50 and 100 gives shape 0.33-0.35 on 48
seen-pair images. Training half of each batch at t < 150 lowered the error at t = 50 to 0.0078 and lifted
that one-step shape to 0.44-0.46 at t = 10 and 50, but cost colour (0.68 / 0.62) and still sampled shape at
0.28 / 0.28, so it is not the default.

Why a small star comes out round: rotation. Squares, triangles and stars are drawn at a random rotation, so
wherever the network cannot tell the rotation, the x_0 that minimises the squared error is the average over
rotations, a disc. The CLIP image embedding does carry the rotation: a ridge probe fitted on the training
split's embeddings reads the angle (mod the symmetry) of seen-pair eval objects to a median error of 5.0
degrees for stars, 5.1 for squares and 5.3 for triangles (chance: 18, 22.5 and 30). So the decoder could draw
the rotation from the embedding from the start of sampling; the tiny one has not learnt to. Screened with the
stage's loss (500 steps, batch 32, 64 seen-pair images): the shape read from the one-step x_0 estimate of the
true image noised to t = 10 / 150 / 300, and colour and shape of DDIM 15 samples at scale 3:

    variant                                                one-step shape       samples: colour  shape
    tiny preset                                            0.44  0.42  0.36     0.58  0.27
    EDM preconditioning, x_0 = c_skip x_t / a + c_out F    1.00  0.52  0.34     (not sampled: x_0 error at
      (Karras et al. 2022, Table 1; sigma_data 0.5)                              t = 50 0.060 against 0.013)
    two U-Nets, t < 150 and t >= 150, half the batch each  0.77  0.45  0.39     0.52  0.17
      (eDiff-I's expert denoisers; caption encoder shared)
    a 15 x 15 depthwise kernel per sample made from the    0.50  0.47  0.41     0.77  0.28
      embedding, convolved with 8 channels at 32 px

The skip makes the clean end exact but leaves the network to predict the noise pixel by pixel, which it cannot
yet; the low-noise expert alone keeps shapes it is shown (trained only on t < 60 for 300 steps: 0.62 / 0.61 at
t = 10 / 150), but neither expert creates them from noise. None of these was adopted.

Accuracy against training time with the tiny preset, from one 2400-step run of the recipe (cosine learning
rate over 2400 steps, 19:33 of training at 2.05 steps/s; its checkpoints evaluated with ``unclip-eval RUN
--checkpoint``; 50 images per split, seen / held-out pairs):

    steps  minutes  colour       shape        position     CLIP cosine  x_0 error at t = 0
    600    4.9      0.90 / 0.90  0.28 / 0.28  0.10 / 0.08  0.64 / 0.68  0.0129
    1200   9.8      0.92 / 0.94  0.34 / 0.22  0.10 / 0.08  0.66 / 0.72  0.0097
    2400   19.6     0.94 / 0.92  0.34 / 0.22  0.06 / 0.14  0.75 / 0.75  0.0076

Colour clears 0.90 from five minutes on; shape stays at chance however long, so the recipe keeps 1300 steps,
which fit the 20 minutes on the slower hosts too.

Edge-weighted loss and fixed variance. Even from the clean image that tiny preset drew a small star as a dot.
Two changes made its estimates faithful. ``stage.edge_loss_weight`` weights the x_0
error within a pixel of an edge of the clean image 1 + that much, renormalised per image
(:func:`~unclip.diffusion.gaussian.edge_emphasis`): on a flat 64 px render the outline is a few percent of the
pixels, so the plain mean spends little gradient on what makes a star a star. ``stage.variance=fixed_small``
drops the learned variance's hybrid term, whose gradient through the shared trunk cost low-noise accuracy;
DDIM, the default sampler, never uses the variance. Screened with the stage's loss (500 steps, batch 32, 64
seen-pair images; x_0 error of the one-step estimate at t = 0 / 150 / 599; shape read from it at t = 0 / 50 /
150; colour read from it at t = 999; colour and shape of DDIM 15 samples at scale 3, where 64 images leave
about +-0.06 of sampling noise; the first row is an earlier session's run of the same screen):

    variant                        x_0 error              one-step shape    colour t=999  samples
    tiny preset                    0.0176 0.0138 0.0283   0.44 0.44 0.42    0.38          0.62  0.22
    edge weight 10                 0.0232 0.0127 0.0334   0.55 0.62 0.58    0.67          0.89  0.23
    edge weight 30                 0.0347 0.0162 0.0483   0.62 0.64 0.61    0.78          0.83  0.20
    fixed_small                    0.0129 0.0136 0.0258   0.44 0.44 0.42    0.42          0.75  0.33
    edge weight 10 + fixed_small   0.0132 0.0124 0.0327   0.61 0.61 0.58    0.67          0.83  0.28

The recipe's settings with both (edge weight 10, fixed_small; 1300 steps, 10:25 for the whole command
including the evaluation, 1.9 GB peak), and with fixed_small alone (10:30, 1.8 GB), against the tiny preset's
1300 steps above (50 images per split, seen / held-out pairs):

    run                    x_0 error at t = 0 / 50 / 150 / 300 / 599     colour       shape        cosine
    before, 1300           0.0100  0.0096  0.0108  0.0134  0.0220        0.92 / 0.90  0.32 / 0.22  0.66 / 0.70
    edge 10 + fixed_small  0.0064  0.0064  0.0082  0.0115  0.0237        0.90 / 0.94  0.34 / 0.32  0.82 / 0.81
    fixed_small (recipe)   0.0093  0.0091  0.0102  0.0128  0.0221        0.90 / 0.90  0.32 / 0.20  0.71 / 0.74

With the edge weight, the estimates from a clean or lightly noised image keep the star's points and the
square's corners, and the CLIP cosine of samples to their sources rose to 0.82 / 0.81. The samples have crisp
edges but irregular outlines: the shape is still not chosen at mid noise (in the screen above, the one-step
shape at t = 500 / 700 was 0.36 / 0.20), so shape stays near chance. On the same weights (100 seen / 50
held-out images, seed 3), guidance scale 1 gave colour 0.91 / 1.00 and shape 0.35 / 0.28 against 0.83 / 0.90
and 0.33 / 0.36 at the exported 3; DDIM 50 with eta 1 and ancestral DDPM 100 did not draw shape better (0.30
and 0.30 on 50 seen-pair images).

From the prior's embeddings the edge weight does harm. Four decoders trained as the demo trains them (800
steps) against one CLIP and prior, each judged in the same pipeline by ``unclip-eval`` (100 captions per
split, seen / held-out pairs, DDIM 15 at scale 3):

    decoder                                colour       shape        CLIP score     Frechet distance
    learned variance, no edge weight       0.75 / 0.92  0.27 / 0.33  0.488 / 0.569  0.447 / 0.465
    fixed_small                            0.82 / 0.85  0.22 / 0.32  0.505 / 0.577  0.457 / 0.449
    edge weight 10 + fixed_small           0.80 / 0.84  0.24 / 0.22  0.510 / 0.527  0.320 / 0.430
    the same, edge weight only at SNR > 1  0.73 / 0.71  0.21 / 0.24  0.474 / 0.506  0.346 / 0.335

The scores are close (100 captions leave about +-0.05 on an accuracy), but the samples are not: for "a small
yellow square in the top left" the edge-weighted decoder draws four to six yellow blobs with pale halos, where
the others draw one. Weighting the outline pulls the least-squares answer toward images that have an edge
wherever the input leaves it uncertain, which at high noise is everywhere; restricting the weight to SNR > 1,
where the posterior is narrow, removed most of the extra blobs but lost colour. So the recipe uses fixed_small
alone, and ``edge_loss_weight`` stays an option, off by default.

Accuracy against training time with edge weight 10 and fixed_small, from one 2400-step run
(``trainer.max_steps=2400 trainer.eval_every=600``; cosine learning rate over 2400 steps; 20:03 for the
command including the four evaluations; 50 images per split, seen / held-out pairs):

    steps  colour       shape        size         position     CLIP cosine  x_0 error at t = 0
    600    0.90 / 0.86  0.30 / 0.24  0.84 / 0.80  0.06 / 0.18  0.70 / 0.74  0.0101
    1200   0.88 / 0.90  0.30 / 0.34  0.90 / 0.86  0.06 / 0.16  0.82 / 0.79  0.0055
    1800   0.98 / 0.96  0.38 / 0.26  0.94 / 0.92  0.08 / 0.12  0.86 / 0.83  0.0044
    2400   0.96 / 0.98  0.40 / 0.26  0.92 / 0.94  0.08 / 0.08  0.86 / 0.84  0.0039

Every measure is above the earlier recipe's at the same step (2400: colour 0.94 / 0.92, shape 0.34 / 0.22,
cosine 0.75 / 0.75), but shape climbs slowly on seen pairs and not on held-out ones, far from the 0.85 asked;
the recipe keeps 1300 steps so that slower hosts stay within 20 minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from unclip.clip.cache import embed_split
from unclip.clip.model import ClipEncoder
from unclip.data.pixels import SplitPixels
from unclip.data.sources import cache_root, load_split, skipped_samples, split_names
from unclip.decoder_sampling import DiffusionDecoder, check_sampling, decoder_config
from unclip.embed import EmbeddedParts
from unclip.errors import ConfigError
from unclip.eval.decoder_eval import denoising_profile, evaluate_decoder
from unclip.images import model_range
from unclip.models.decoder import DecoderConfig
from unclip.stages.base import Stage, image_diffusion_settings

# column of an unclip-embed part -> (batch key, dtype) of a streamed training example
STREAM_DTYPES = {
    "image": ("pixels", np.uint8),
    "image_embedding": ("image_embedding", np.float32),
    "token_ids": ("token_ids", np.int64),
}


class ImagesWithEmbeddings(Dataset):
    """Rows of a rendered split (``image``) beside the same rows of its embedding (``image_embedding``,
    ``token_ids``), read a batch at a time: pixels as uint8 (B, S, S, 3) (see :class:`SplitPixels`)."""

    def __init__(self, images: datasets.Dataset, embedded: datasets.Dataset, decoded_cache_mb: int) -> None:
        if len(images) != len(embedded):
            raise ConfigError(f"{len(images)} images but {len(embedded)} embeddings: the caches disagree")
        self.pixels = SplitPixels(images, decoded_cache_mb)
        self.embedded = embedded.select_columns(["image_embedding", "token_ids"]).with_format("numpy")

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[0] for name, value in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self.embedded[indices]
        return {
            "pixels": torch.from_numpy(self.pixels[indices]),
            "image_embedding": torch.from_numpy(np.asarray(rows["image_embedding"], dtype=np.float32)),
            "token_ids": torch.from_numpy(np.asarray(rows["token_ids"], dtype=np.int64)),
        }


def _overrides(node: DictConfig) -> dict[str, Any]:
    """The fields of an overrides node that are set (null keeps the preset's)."""
    return {k: v for k, v in OmegaConf.to_container(node).items() if v is not None}


def _config(stage: DictConfig, clip_embed_dim: int, context_length: int) -> DecoderConfig:
    return decoder_config(
        stage.model.preset,
        clip_embed_dim=clip_embed_dim,
        context_length=context_length,
        learn_sigma=stage.variance == "learned",
        unet=_overrides(stage.model.unet),
        text=_overrides(stage.model.text),
        num_clip_tokens=stage.model.num_clip_tokens,
    )


def _check(stage: DictConfig) -> None:
    """Everything about ``stage`` that can be checked before CLIP is loaded; errors name the key."""
    if OmegaConf.is_missing(stage, "clip"):
        raise ConfigError("stage.clip is required: the folder of a trained CLIP (a CLIP run's export/)")
    for key in ("image_embedding_drop", "caption_drop"):
        if not 0.0 <= stage[key] < 1.0:
            raise ConfigError(f"stage.{key}={stage[key]} must be in [0, 1)")
    if not stage.edge_loss_weight >= 0.0:
        raise ConfigError(f"stage.edge_loss_weight={stage.edge_loss_weight} must be >= 0")
    if stage.eval_images < 2:
        raise ConfigError(f"stage.eval_images={stage.eval_images} must be at least 2")
    image_diffusion_settings(stage)
    config = _config(stage, clip_embed_dim=8, context_length=8)  # stand-ins: the CLIP is not loaded yet
    if stage.image_size < 1 or stage.image_size % config.unet.size_multiple:
        raise ConfigError(
            f"stage.image_size={stage.image_size} must be a positive multiple of {config.unet.size_multiple}"
        )
    check_sampling(OmegaConf.to_container(stage.sampling), stage.num_timesteps)


class DecoderStage(Stage):
    """Train the unCLIP decoder on images and the cached CLIP embeddings of the configured data."""

    name = "decoder"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        _check(cfg.stage)

    def prepare_data(self) -> None:
        data, size, precomputed = self.cfg.data, int(self.cfg.stage.image_size), self.cfg.stage.embeddings
        self.encoder = ClipEncoder.load(self.cfg.stage.clip).eval().requires_grad_(False)
        self.clip_fingerprint = self.encoder.fingerprint()
        if precomputed.path:  # an unclip-embed job's parts: each row carries its image too
            self.parts = EmbeddedParts(precomputed, self.clip_fingerprint, cache_root(data))
            if self.parts.manifest["image_size"] != size:
                raise ConfigError(
                    f"{precomputed.path} stores images at {self.parts.manifest['image_size']} px, not at "
                    f"stage.image_size={size}: run unclip-embed with image_size={size}"
                )
            self.split_names, self.embedded = self.parts.split_names, self.parts.splits
            self.images = self.embedded
            return
        self.split_names = split_names(data)
        self.images = {name: load_split(data, name, size) for name in self.split_names}
        self.embedded = {
            name: embed_split(self.encoder, split, cache_root(data)) for name, split in self.images.items()
        }

    def build_model(self) -> torch.nn.Module:
        stage = self.cfg.stage
        config = _config(stage, self.encoder.embed_dim, self.encoder.context_length)
        return DiffusionDecoder(
            config,
            int(stage.image_size),
            image_diffusion_settings(stage),
            OmegaConf.to_container(stage.sampling),
        )

    def setup(self, accelerator: Any) -> None:
        super().setup(accelerator)
        self.encoder.to(accelerator.device)  # evaluation embeds the decoded images next to the decoder

    def train_dataset(self) -> Dataset:
        return ImagesWithEmbeddings(
            self.images["train"], self.embedded["train"], self.cfg.data.decoded_cache_mb
        )

    def skipped_samples(self) -> int:
        if self.cfg.stage.embeddings.path:
            return self.parts.skipped  # counted by unclip-embed
        return skipped_samples(self.cfg.data, "train", int(self.cfg.stage.image_size))

    def streams_training_data(self) -> bool:
        return bool(self.cfg.stage.embeddings.path and self.cfg.stage.embeddings.stream)

    def train_stream(self, **stream: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        for row in self.parts.stream_rows("train", list(STREAM_DTYPES), **stream):
            example = {
                key: torch.tensor(np.asarray(row[column], dtype))
                for column, (key, dtype) in STREAM_DTYPES.items()
            }
            yield example, 0

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        images = model_range(batch["pixels"].permute(0, 3, 1, 2))
        terms = model(
            images,
            batch["image_embedding"],
            batch["token_ids"],
            image_embedding_drop=self.cfg.stage.image_embedding_drop,
            caption_drop=self.cfg.stage.caption_drop,
            edge_loss_weight=self.cfg.stage.edge_loss_weight,
        )
        extras = {"mse": terms["mse"].mean().detach()}
        if "vb" in terms:
            extras["vb"] = terms["vb"].mean().detach()
        return terms["loss"].mean(), extras

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        stage = self.cfg.stage
        modes = [(True, "")] + ([(False, "no_caption/")] if stage.eval_without_caption else [])
        metrics: dict[str, float] = {}
        for split in self.split_names[1:]:
            rows = self.embedded[split]
            rows = rows.select(range(min(stage.eval_images, len(rows))))
            for with_caption, prefix in modes:
                generator = torch.Generator().manual_seed(int(self.cfg.seed))
                found = evaluate_decoder(
                    model, self.encoder, rows, generator=generator, with_caption=with_caption
                )
                metrics.update({f"{split}/{prefix}{key}": value for key, value in found.items()})
            examples = ImagesWithEmbeddings(self.images[split].select(range(len(rows))), rows, 0)
            batch = examples.__getitems__(list(range(len(rows))))
            profile = denoising_profile(
                model,
                model_range(batch["pixels"].permute(0, 3, 1, 2)),
                batch["image_embedding"],
                batch["token_ids"],
                generator=torch.Generator().manual_seed(int(self.cfg.seed)),
            )
            metrics.update({f"{split}/{key}": value for key, value in profile.items()})
        return metrics

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        model.save(folder, self.clip_fingerprint)

    def load_export(self, folder: Path) -> torch.nn.Module:
        model = DiffusionDecoder.load(folder, self.clip_fingerprint)
        model.sampling = check_sampling(
            OmegaConf.to_container(self.cfg.stage.sampling), model.diffusion.num_timesteps
        )
        return model
