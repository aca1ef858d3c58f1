"""Command line entry point: ``python -m pipeline.run [stage=1|2|3] [overrides]``.

The one module that imports ``stages/``. Hydra composes ``conf/config.yaml`` over the
typed schema in :mod:`pipeline.config`; :func:`pipeline.config.validate` rejects
out-of-range values before any stage starts.
"""

from __future__ import annotations

import logging
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.cache.storage import StorageError
from pipeline.config import Config, register, validate

log = logging.getLogger("pipeline.run")
register()


def dispatch(cfg: Config, run_dir: str) -> None:
    from stages import audit, capture, distill

    steps = {"1": [capture], "2": [audit], "3": [distill]}
    for module in steps.get(cfg.stage, [capture, audit, distill]):
        module.main(cfg, run_dir)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)  # typed dataclasses, enums resolved
    try:
        validate(cfg)
    except ValueError as e:
        log.error("%s", e)
        raise SystemExit(2) from e
    run_dir = HydraConfig.get().runtime.output_dir
    log.info("run folder: %s", run_dir)
    try:
        dispatch(cfg, run_dir)
    except (ValueError, FileNotFoundError, StorageError, TimeoutError) as e:  # say what and how to fix, no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s\n(set HYDRA_FULL_ERROR=1 for the traceback)", type(e).__name__, e)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
