"""`python -m sdbuild [group=option ...]`: build, run and measure one pipeline (or a sweep with --multirun)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import config_dir
from .errors import SpecError
from .spec import check_keys, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        check_keys(cfg)  # before anything runs: an unknown key is a user mistake, not a row
    except SpecError as exc:
        print(f"sdbuild: refused:\n{exc}", file=sys.stderr)
        sys.exit(2)
    from .app import run_from_hydra

    code = run_from_hydra(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
