"""The one training loop every stage runs in (DESIGN §1), on Accelerate.

Accelerate supplies the device, DDP across GPUs and nodes (``accelerate launch`` / ``torchrun``), bf16/fp16
autocast with loss scaling, and gradient accumulation. ``trainer.batch_size`` is the global batch of one
optimizer step: the data loader yields ``batch_size / grad_accum`` examples per micro-step and Accelerate
splits each of those batches across processes, so N processes with the same global batch follow the same
optimisation path as one process.

Data order is a pure function of (seed, epoch): a resumed run skips the batches it has already seen and
continues exactly where the interrupted one stopped. Map-style data (cached splits) is drawn by a permutation
of its rows; streamed data (``Stage.train_stream``: WebDataset or embedding shards) by the stream layout of
:mod:`unclip.data.streaming`, which keeps the same property: the global batch is the same for any number of
processes. The progress bar and the metrics show how many corrupt samples were skipped (``skipped``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sysconfig
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, send_to_device, set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from unclip.config.schema import validate
from unclip.data.streaming import StreamChunks, micro_batches, stream_layout
from unclip.errors import CheckpointError, ConfigError, DataError
from unclip.precision import resolve_precision
from unclip.stages import Stage, build_stage
from unclip.train.checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from unclip.train.ema import EMA


class EpochSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from (seed, epoch) alone, so any epoch can be replayed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def cpu_compile_missing() -> str | None:
    """What torch.compile's CPU backend (inductor, which builds its kernels as C++ Python extensions) lacks
    here, or None: a C++ compiler (``$CXX``, by default g++) or Python's headers."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"a C++ compiler, and {compiler!r} is not on PATH (set CXX to another one)"
    headers = Path(sysconfig.get_path("include")) / "Python.h"
    if not headers.is_file():
        return f"Python's headers, and {headers} does not exist (install this Python's development package)"
    return None


def learning_rate(cfg: DictConfig, step: int) -> float:
    """Linear warmup over ``optim.warmup_steps``, then constant or cosine decay to ``min_lr_ratio * lr``."""
    lr, warmup, total = cfg.optim.lr, cfg.optim.warmup_steps, cfg.trainer.max_steps
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if cfg.optim.schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.optim.min_lr_ratio
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and convolution kernels; leave biases, norms, embeddings' scalars alone."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Runs one stage's training from a composed, validated config."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        validate(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        t = cfg.trainer
        # auto is decided on this process's device before Accelerate sets up autocast
        device = PartialState(cpu=t.cpu).device
        self.precision = resolve_precision(t.precision, device, "trainer.precision")
        if t.compile and device.type == "cpu" and (missing := cpu_compile_missing()):
            raise ConfigError(
                f"trainer.compile=true on the CPU needs {missing}; or set trainer.compile=false"
            )
        self.accelerator = Accelerator(
            mixed_precision=self.precision.precision,
            gradient_accumulation_steps=t.grad_accum,
            cpu=t.cpu,
            log_with="wandb" if cfg.logger.kind == "wandb" else None,
            project_dir=str(self.run_dir),
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )
        micro = t.batch_size // t.grad_accum
        if micro % self.accelerator.num_processes:
            raise ConfigError(
                f"trainer.batch_size / trainer.grad_accum = {micro} must be divisible by the "
                f"{self.accelerator.num_processes} processes"
            )
        self.micro_batch = micro
        self.stage: Stage = build_stage(cfg)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _log(self, record: dict[str, Any], step: int) -> None:
        if self.cfg.logger.kind != "none":
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")

    def _resume_path(self) -> Path | None:
        resume = self.cfg.resume
        if resume is None:
            return None
        source = self.run_dir if resume == "latest" else Path(str(resume))
        path = latest_checkpoint(source)
        if path is None and resume != "latest":
            raise CheckpointError(f"resume={resume!r}: no checkpoint found there")
        return path

    def _evaluate(self, ema: EMA, step: int) -> dict[str, float]:
        """The stage's evaluation on an EMA copy of the model (main process; the others wait)."""
        metrics: dict[str, float] = {}
        if self.is_main:
            # evaluation draws its own random numbers; the training stream must not notice (exact resume)
            device = self.accelerator.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                metrics = self.stage.evaluate(self._ema_model(ema))
            if metrics:
                self._log({f"eval/{k}": v for k, v in metrics.items()}, step)
                (self.run_dir / "eval").mkdir(exist_ok=True)
                (self.run_dir / "eval" / f"step_{step:08d}.json").write_text(json.dumps(metrics, indent=2))
        self.accelerator.wait_for_everyone()
        return metrics

    def _ema_model(self, ema: EMA) -> torch.nn.Module:
        model = self.stage.build_model().to(self.accelerator.device)
        ema.copy_to(model)
        return model.eval()

    def _map_style_loader(self) -> DataLoader:
        t = self.cfg.trainer
        dataset = self.stage.train_dataset()
        loader = DataLoader(
            dataset,
            batch_size=self.micro_batch,
            sampler=EpochSampler(len(dataset), self.cfg.seed),
            drop_last=True,
            num_workers=t.num_workers,
            collate_fn=self.stage.collate,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            persistent_workers=t.num_workers > 0,
        )
        if len(loader) < t.grad_accum:
            raise ConfigError(
                f"the training split has {len(dataset)} examples: fewer than one batch of {t.batch_size}"
            )
        return loader

    def _map_style_epoch(self, state: TrainingState) -> Iterator[tuple[Any, int]]:
        """The rest of the epoch ``state.step`` falls in: a permutation drawn from (seed, epoch), the batches
        already trained on skipped."""
        grad_accum = self.cfg.trainer.grad_accum
        epoch, done_in_epoch = divmod(state.step, len(self._loader) // grad_accum)
        batches = self._loader
        if done_in_epoch:
            batches = self.accelerator.skip_first_batches(batches, done_in_epoch * grad_accum)
        batches.set_epoch(epoch)  # Accelerate's loader re-seeds the sampler from its own epoch counter
        for batch in batches:
            yield batch, 0

    def _stream_chunks(self) -> StreamChunks:
        """This process's share of the streams (see :mod:`unclip.data.streaming`)."""
        t, acc = self.cfg.trainer, self.accelerator
        chunk = stream_layout(t.streams, acc.num_processes, t.num_workers, t.batch_size // t.grad_accum)
        streams = (t.batch_size // t.grad_accum) // chunk
        seed = int(self.cfg.seed)

        def open_stream(index: int, epoch: int) -> Iterator[tuple[Any, int]]:
            return self.stage.train_stream(seed=seed, epoch=epoch, stream_index=index, num_streams=streams)

        mine = list(range(acc.process_index, streams, acc.num_processes))
        return StreamChunks(open_stream, mine, chunk, self.stage.collate)

    def _streamed_epoch(self, state: TrainingState) -> Iterator[tuple[Any, int]]:
        """The rest of epoch ``state.epoch`` of the streams; the micro-batches already trained on are read
        again and dropped, so a resumed run continues with exactly the data it would have seen."""
        t, acc = self.cfg.trainer, self.accelerator
        self._chunks.set_epoch(state.epoch)
        loader = DataLoader(self._chunks, batch_size=None, num_workers=t.num_workers)
        batches = micro_batches(iter(loader), len(self._chunks.streams))
        done = (state.step - state.epoch_start) * t.grad_accum
        for position in count():
            item = next(batches, None)
            if self._any_process(item is None):  # one process out of data ends the epoch for all
                return
            if position >= done:
                batch, skipped = item
                yield send_to_device(batch, acc.device), skipped

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, "sum").item() > 0)

    def fit(self) -> dict[str, float]:
        """Train to ``trainer.max_steps``; return the final evaluation metrics."""
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        set_seed(cfg.seed)
        with acc.main_process_first():
            self.stage.prepare_data()
        model = self.stage.build_model()
        if acc.num_processes > 1 and acc.device.type == "cuda":
            # one set of BatchNorm statistics over the global batch (PyTorch runs SyncBatchNorm on GPUs only)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if t.compile:
            model.compile()  # in place: the state dict keeps its keys
        ema = EMA(model, t.ema_decay, t.ema_warmup)
        optimizer = torch.optim.AdamW(
            _param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            # one kernel for every parameter instead of a Python loop over them: on 2 CPU cores the tiny
            # decoder's optimizer step fell from 43-47 ms to 10 ms (step 0.82-0.85 s -> 0.77 s, batch 32)
            fused=True,
        )
        if self.stage.streams_training_data():
            self._chunks = self._stream_chunks()
            model, optimizer = acc.prepare(model, optimizer)
            epoch_batches = self._streamed_epoch
        else:
            model, optimizer, self._loader = acc.prepare(model, optimizer, self._map_style_loader())
            epoch_batches = self._map_style_epoch
        ema.shadow = {k: v.to(acc.device) for k, v in ema.shadow.items()}
        self.stage.setup(acc)

        if self.cfg.trainer.precision == "auto":
            acc.print(f"[unclip] {self.precision.reason}")
        state = TrainingState(step=0, ema_updates=0)
        resume_from = self._resume_path()
        if resume_from is not None:
            state = load_checkpoint(acc, resume_from, model, ema, optimizer)
            acc.print(f"[unclip] resumed from {resume_from} at step {state.step}")
        step = state.step
        if cfg.logger.kind == "wandb":
            acc.init_trackers(
                cfg.logger.project,
                config=OmegaConf.to_container(cfg, resolve=True),
                init_kwargs={
                    "wandb": {"mode": cfg.logger.mode, "dir": str(self.run_dir), "name": self.run_dir.name}
                },
            )

        bar = tqdm(
            total=t.max_steps,
            initial=step,
            disable=not (self.is_main and t.progress),
            desc=f"train {self.stage.name}",
            unit="step",
            dynamic_ncols=True,
        )
        skipped_before = self.stage.skipped_samples()  # corrupt samples dropped while building caches
        skipped_streamed = 0  # this process's, since the run (or its resumption) began
        loss_sum = torch.zeros((), device=acc.device)
        loss_count, window_start, window_step = 0, time.perf_counter(), step
        metrics: dict[str, float] = {}
        model.train()
        while step < t.max_steps:
            for batch, skipped in epoch_batches(state):
                skipped_streamed += skipped
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, step)
                with acc.accumulate(model):
                    loss, extras = self.stage.loss(model, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and t.grad_clip > 0:
                        acc.clip_grad_norm_(model.parameters(), t.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                loss_count += 1
                if not acc.sync_gradients:
                    continue
                step += 1
                state.step = step
                unwrapped = acc.unwrap_model(model)
                self.stage.after_optimizer_step(unwrapped)
                ema.update(unwrapped)
                bar.update(1)
                if step % t.log_every == 0 or step == t.max_steps:
                    elapsed = time.perf_counter() - window_start
                    images_per_s = (step - window_step) * t.batch_size / max(elapsed, 1e-9)
                    skipped_total = skipped_before + int(
                        acc.reduce(torch.tensor(skipped_streamed, device=acc.device), "sum").item()
                    )
                    record = {
                        "loss": (acc.reduce(loss_sum, "mean") / loss_count).item(),
                        "lr": learning_rate(cfg, step - 1),
                        "images_per_s": images_per_s,
                        "skipped_samples": skipped_total,
                        **{k: float(v) for k, v in extras.items()},
                    }
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}", img_s=f"{images_per_s:.0f}", skipped=skipped_total
                    )
                    self._log(record, step)
                    loss_sum.zero_()
                    loss_count, window_start, window_step = 0, time.perf_counter(), step
                if step % t.checkpoint_every == 0 or step == t.max_steps:
                    state.ema_updates = ema.num_updates
                    save_checkpoint(acc, self.run_dir, model, ema, optimizer, state, t.keep_checkpoints)
                if (t.eval_every and step % t.eval_every == 0) or step == t.max_steps:
                    metrics = self._evaluate(ema, step)
                if step >= t.max_steps:
                    break
            else:  # the data ran out: the next epoch begins
                if step == state.epoch_start:
                    raise DataError(
                        f"an epoch of the training data gave no optimizer step: fewer than one batch of "
                        f"{t.batch_size} examples"
                    )
                state.epoch, state.epoch_start = state.epoch + 1, step
        bar.close()
        if self.is_main:
            with torch.random.fork_rng(devices=[]):
                self.stage.export(self._ema_model(ema), self.run_dir / "export")
        acc.wait_for_everyone()
        acc.end_training()
        return metrics


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train the configured stage into ``run_dir``; return its final evaluation."""
    return Trainer(cfg, run_dir).fit()
