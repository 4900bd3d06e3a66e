"""``unclip-eval``: judge a pipeline folder on the ``shapes`` eval captions, or evaluate one trained stage
again. The first argument picks the mode.

**A pipeline** (the first argument is ``key=value`` or an option: ``-m``, ``--help``, ``--cfg job``): a
Hydra app (``conf/evaluate.yaml``, schema ``PipelineEvalConfig``): every option an override, ``-m`` sweeps::

    unclip-eval pipeline=runs/shapes/pipeline captions=100 out=runs/shapes/eval
    unclip-eval pipeline=runs/shapes/pipeline decoder.guidance_scale=3 prior.steps=32 precision=bf16
    unclip-eval -m pipeline=runs/shapes/pipeline decoder.guidance_scale=1,3,5 decoder.steps=10,25

It samples one 64 px image per caption through text -> prior -> decoder and writes ``eval.json``,
``report.md`` and ``grid.png`` into ``out`` -- by default Hydra's job folder ``runs/eval/<date>``; in a ``-m``
sweep ``out`` (default ``multirun/eval/<date>``) is the sweep folder and each job writes into its numbered
subfolder, beside its ``.hydra/overrides.yaml``. The metrics (attribute accuracy over the captions that name
each attribute, CLIP score, Fréchet distance in CLIP space with its noise floor) are defined in
:mod:`unclip.eval.pipeline_eval`.

**A trained stage** (the first argument is a run folder)::

    unclip-eval runs/shapes/prior                                        # the run's export, its own settings
    unclip-eval runs/shapes/prior stage.sampling.guidance_scale=4 stage.eval_captions=500
    unclip-eval runs/shapes/clip --export other/export                    # another component folder
    unclip-eval runs/shapes/decoder --checkpoint runs/shapes/decoder/checkpoints/step_00000500  # EMA weights

The run's configuration is composed again from its saved overrides (``.hydra/overrides.yaml``) followed by the
new ones, so a typo or a wrong type is refused exactly as ``unclip-train`` refuses it. The stage's own
evaluation (the one the trainer's eval hook runs) is applied to the run's ``export/`` -- or to the EMA weights
of one of its checkpoints, which is how a learning curve is measured after training -- and printed as JSON;
``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from unclip.cli.common import CONFIG_PATH, exit_with_error, friendly_errors, sampling_overrides
from unclip.config.schema import register_configs
from unclip.errors import ConfigError, UnclipError

register_configs()


def compose_run_config(run: Path, overrides: list[str]) -> Any:
    """The run's training config, recomposed from its saved command-line overrides plus ``overrides``."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from unclip.config.schema import register_configs, validate

    saved = run / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run} is not an unclip-train run folder: {saved} does not exist")
    previous = [o for o in OmegaConf.to_container(OmegaConf.load(saved)) if not o.startswith("hydra.")]
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not key=value")
    register_configs()
    try:
        with initialize_config_module("unclip.conf", version_base="1.3"):
            cfg = compose(config_name="train", overrides=previous + overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose the config of {run} with {overrides}: {err}") from err
    validate(cfg)
    return cfg


def evaluate_run(
    run: Path, overrides: list[str], export: Path | None = None, checkpoint: Path | None = None
) -> dict[str, float]:
    """Load the run's component (``export`` or ``<run>/export``), or the EMA weights of a training
    ``checkpoint`` folder, and return the stage's evaluation."""
    from accelerate import Accelerator

    from unclip.stages import build_stage
    from unclip.train.checkpoint import load_ema_weights

    if export is not None and checkpoint is not None:
        raise ConfigError("give --export or --checkpoint, not both")
    cfg = compose_run_config(run, overrides)
    stage = build_stage(cfg)
    stage.prepare_data()
    if checkpoint is None:
        model = stage.load_export(export or run / "export")
    else:
        model = load_ema_weights(checkpoint, stage.build_model())
    accelerator = Accelerator(cpu=bool(cfg.trainer.cpu))
    stage.setup(accelerator)
    return stage.evaluate(model.to(accelerator.device).eval())


def evaluate_run_main(argv: list[str]) -> None:
    """``unclip-eval RUN_FOLDER [overrides] [--export F | --checkpoint F] [--out F]``."""
    parser = argparse.ArgumentParser(
        prog="unclip-eval",
        description="Evaluate a trained stage (the trainer's eval hook) from its run folder. "
        "(unclip-eval pipeline=FOLDER [key=value ...] judges a whole pipeline instead: "
        "unclip-eval --help lists its options.)",
    )
    parser.add_argument("run", type=Path, help="an unclip-train run folder (holds .hydra/ and export/)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. stage.sampling.guidance_scale=4")
    parser.add_argument("--export", type=Path, default=None, help="component folder (default: RUN/export)")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="evaluate this checkpoint folder's EMA weights instead"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    try:
        metrics = evaluate_run(args.run, args.overrides, args.export, args.checkpoint)
    except UnclipError as err:
        exit_with_error(err, debug=args.debug)
    report = json.dumps({"run": str(args.run), "overrides": args.overrides, "eval": metrics}, indent=2)
    print(report)
    if args.out is not None:
        from unclip.io import write_text

        write_text(args.out, report + "\n")


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
@friendly_errors
def evaluate_pipeline_main(cfg: DictConfig) -> None:
    """``unclip-eval pipeline=FOLDER [key=value ...]``: write the pipeline's report and print it as JSON."""
    if OmegaConf.is_missing(cfg, "pipeline"):
        raise ConfigError("give pipeline=<pipeline folder> (or a run folder: unclip-eval RUN_FOLDER ...)")
    from unclip.eval.pipeline_eval import evaluate_pipeline, write_report  # heavy: after Hydra's checks

    hydra_cfg = HydraConfig.get()
    job_folder = hydra_cfg.mode == RunMode.MULTIRUN or cfg.out is None
    out = Path(hydra_cfg.runtime.output_dir if job_folder else str(cfg.out))
    report, grids = evaluate_pipeline(cfg, sampling_overrides(cfg.prior), sampling_overrides(cfg.decoder))
    write_report(report, grids, out)
    print(f"report folder: {out}")
    print(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Dispatch on the first argument: a run folder (no ``=``, not an option) or the pipeline app."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and "=" not in args[0] and not args[0].startswith("-"):
        evaluate_run_main(args)
        return
    if argv is None:
        evaluate_pipeline_main()
        return
    saved, sys.argv = sys.argv, ["unclip-eval", *args]  # Hydra reads its command line from sys.argv
    try:
        evaluate_pipeline_main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
