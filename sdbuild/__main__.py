"""`python -m sdbuild [group=option ...]`: build, run and measure one pipeline (or a sweep with --multirun)."""

from __future__ import annotations

import string
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .config import config_dir
from .errors import SpecError
from .spec import check_keys, register_configs

register_configs()


def main() -> None:
    """The CLI. A bare `--help` is answered here, fast; everything else goes to Hydra."""
    if len(sys.argv) == 2 and sys.argv[1] in ("--help", "-h"):
        print(fast_help())
        return
    hydra_main()


def group_listing(conf: Path) -> str:
    """`group: option, option` for every group folder of `conf/`, in Hydra's own help format,
    read from the file names alone (Hydra's listing composes each of the ~100 options)."""
    groups = sorted(d for d in conf.iterdir() if d.is_dir() and d.name != "hydra")
    return "".join(f"{d.name}: {', '.join(sorted(f.stem for f in d.glob('*.yaml')))}\n" for d in groups)


def fast_help() -> str:
    """sdbuild's help template (conf/hydra/help/sdbuild.yaml), rendered without composing."""
    from omegaconf import OmegaConf

    conf = Path(config_dir())
    template = OmegaConf.load(conf / "hydra" / "help" / "sdbuild.yaml").template
    return string.Template(template).substitute(APP_CONFIG_GROUPS=group_listing(conf))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def hydra_main(cfg: DictConfig) -> dict | None:
    """Hydra's task function: returns the job's row (Hydra callbacks and launchers get it as
    `JobReturn.return_value`); a failed single run exits non-zero."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        check_keys(cfg)  # before anything runs: an unknown key is a user mistake, not a row
    except SpecError as exc:
        print(f"sdbuild: refused:\n{exc}", file=sys.stderr)
        sys.exit(2)
    if cfg.get("dry_run"):
        if code := dry_run(cfg):
            sys.exit(code)
        return None
    from .app import exit_code, run_from_hydra

    row = run_from_hydra(cfg)
    code = exit_code(row, HydraConfig.get().mode == RunMode.MULTIRUN)
    if code:
        sys.exit(code)
    return row


def dry_run(cfg: DictConfig) -> int:
    """`dry_run=true`: print the resolved spec and the build plan, or the refusal; load nothing.
    In a sweep every job prints its plan and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .dryrun import show
    from .spec import to_spec

    try:
        print(show(to_spec(cfg)), flush=True)
    except SpecError as exc:
        print(f"sdbuild: refused (dry run):\n{exc}", file=sys.stderr, flush=True)
        return 0 if HydraConfig.get().mode == RunMode.MULTIRUN else 2
    return 0


if __name__ == "__main__":
    main()
