"""Where the YAML configs live, and composing them from Python without the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .spec import Spec, register_configs, to_spec

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> str:
    """`conf/` of a checkout, else the copy installed inside the package (`sdbuild/conf`)."""
    checkout = PACKAGE_DIR.parent / "conf"
    if (checkout / "config.yaml").exists():
        return str(checkout)
    return str(PACKAGE_DIR / "conf")


def compose(overrides: Sequence[str] = ()) -> Spec:
    """Compose `conf/config.yaml` with Hydra-style overrides and return the typed spec.

    >>> spec = compose(["precision=bf16", "attention=sdpa", "run.steps=10"])
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_spec(cfg)
