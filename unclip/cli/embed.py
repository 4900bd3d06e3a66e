"""``unclip-embed``: CLIP embeddings of a whole data source, once, as sharded parquet (:mod:`unclip.embed`).

unclip-embed clip=runs/clip/.../export out=embeddings/mydata data=folder data.path=photos/
accelerate launch -m unclip.cli.embed clip=... out=... data=webdataset data.urls='shards/{00000..00999}.tar'

Run it again with the same arguments after an interruption: finished parts are kept, the rest are embedded.
Then train on the embeddings: ``unclip-train stage=prior stage.embeddings=<out> ...`` (and ``stage=decoder``).
"""

from __future__ import annotations

import json
import os

import hydra
from omegaconf import DictConfig

from unclip.cli.common import CONFIG_PATH, friendly_errors, slurm_distributed_env
from unclip.config.schema import register_configs

register_configs()


@hydra.main(config_path=CONFIG_PATH, config_name="embed", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    """Embed ``cfg.data`` with the CLIP in ``cfg.clip`` into ``cfg.out`` and print the row counts."""
    import time

    from accelerate import Accelerator

    from unclip.data.sources import check_source
    from unclip.embed import embed_source

    check_source(cfg.data)
    os.environ.update(slurm_distributed_env())  # one SLURM task per GPU (hydra/launcher=slurm_multigpu)
    accelerator = Accelerator(cpu=cfg.cpu)
    start = time.perf_counter()
    manifest = embed_source(cfg, accelerator)
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        rows = {name: split["rows"] for name, split in manifest["splits"].items()}
        print(json.dumps({"out": str(cfg.out), "rows": rows, "seconds": round(seconds, 1)}, indent=2))


if __name__ == "__main__":
    main()
