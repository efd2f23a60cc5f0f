"""`python -m sdbuild [group=option ...]`: build, run and measure one pipeline (or a sweep with --multirun)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import config_dir
from .spec import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    from .app import run_from_hydra

    code = run_from_hydra(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
