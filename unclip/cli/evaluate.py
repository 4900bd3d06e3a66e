"""``unclip-eval``: evaluate a trained stage again, as its run did or with changed settings.

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
from pathlib import Path
from typing import Any

from unclip.cli.common import exit_with_error
from unclip.errors import ConfigError, UnclipError


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="unclip-eval",
        description="Evaluate a trained stage (the trainer's eval hook) from its run folder.",
    )
    parser.add_argument("run", type=Path, help="an unclip-train run folder (holds .hydra/ and export/)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. stage.sampling.guidance_scale=4")
    parser.add_argument("--export", type=Path, default=None, help="component folder (default: RUN/export)")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="evaluate this checkpoint folder's EMA weights instead"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_run(args.run, args.overrides, args.export, args.checkpoint)
    except UnclipError as err:
        exit_with_error(err, debug=args.debug)
    report = json.dumps({"run": str(args.run), "overrides": args.overrides, "eval": metrics}, indent=2)
    print(report)
    if args.out is not None:
        from unclip.io import write_text

        write_text(args.out, report + "\n")


if __name__ == "__main__":
    main()
