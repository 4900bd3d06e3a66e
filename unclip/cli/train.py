"""``unclip-train``: train one stage of the cascade, configured by Hydra.

unclip-train stage=clip data=shapes trainer.max_steps=2000
unclip-train -m stage=clip optim.lr=1e-3,3e-4          # a sweep, one output folder per job
accelerate launch -m unclip.cli.train stage=clip ...    # many GPUs / nodes
"""

from __future__ import annotations

import json
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from unclip.cli.common import CONFIG_PATH, friendly_errors, slurm_distributed_env
from unclip.config.schema import register_configs

register_configs()


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    """Train ``cfg.stage`` into Hydra's output folder and print its final evaluation."""
    from unclip.train.trainer import Trainer  # heavy imports after Hydra has parsed the command line

    os.environ.update(slurm_distributed_env())  # one SLURM task per GPU (hydra/launcher=slurm_multigpu)
    run_dir = HydraConfig.get().runtime.output_dir
    trainer = Trainer(cfg, run_dir)
    metrics = trainer.fit()
    if trainer.is_main:
        print(f"run folder: {run_dir}")
        print(json.dumps({"stage": cfg.stage.name, "eval": metrics}, indent=2))
    return None


if __name__ == "__main__":
    main()
