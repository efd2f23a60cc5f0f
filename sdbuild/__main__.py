"""`python -m sdbuild [group=option ...]`: build, run and measure one pipeline (or a sweep with --multirun)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import config_dir
from .spec import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> dict:
    """Hydra's task function: returns the job's row (Hydra callbacks and launchers get it as
    `JobReturn.return_value`); a failed single run exits non-zero."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .app import exit_code, run_from_hydra

    row = run_from_hydra(cfg)
    code = exit_code(row, HydraConfig.get().mode == RunMode.MULTIRUN)
    if code:
        sys.exit(code)
    return row


if __name__ == "__main__":
    main()
