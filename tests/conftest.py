import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("SDBUILD_SLOW") == "1"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow or SDBUILD_SLOW=1"))
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none on this machine"))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One tiny-model cache for the whole session (built once, ~5 s), shared with subprocesses."""
    cache = os.environ.get("SDBUILD_TEST_CACHE") or str(tmp_path_factory.mktemp("sdbuild-cache"))
    os.environ["SDBUILD_CACHE"] = cache
    return Path(cache)


def package_marks(*packages: str, install: str = 'pip install -e ".[xformers,offload,quant]"') -> list:
    """The marks of a test (or a `pytest.param` case) that needs optional packages (extras): it
    skips, naming what is missing and how to install it, where they are absent, and `pytest -m
    extras` selects it (CI's second pass)."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    return [pytest.mark.extras,
            pytest.mark.skipif(bool(missing), reason=f"needs the optional package(s) {', '.join(missing)}: {install}")]


def needs_packages(*packages: str, **kwargs):
    """Decorator form of `package_marks`."""

    def decorate(test):
        for mark in package_marks(*packages, **kwargs):
            test = mark(test)
        return test

    return decorate


# run.timeout_s=0: sweep jobs in the sweep's own process (no time limit), as most sweep tests expect;
# the default (each job in a child process with a time limit) is tested in test_faults.py.
FAST = ["run.steps=4", "run.warmup=0", "run.repeats=1", "run.timeout_s=0"]


def run_cli(*args, cwd=ROOT, env=None, timeout=600):
    """Run `python -m sdbuild ARGS` and return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "sdbuild", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def shared_pipeline():
    """`built(*overrides)` once per session and spec: for tests that inspect or run a pipeline
    without changing it. Each hand-out first sets the spec's process-wide switches again (TF32
    flags...), as a fresh build would."""
    import json

    import sdbuild
    from sdbuild.builder import build_pipeline
    from sdbuild.levers.precision import set_global_switches
    from sdbuild.spec import spec_to_dict

    cache = {}

    def get(*overrides):
        spec = sdbuild.compose([*FAST, *overrides])
        key = json.dumps(spec_to_dict(spec), sort_keys=True)
        if key not in cache:
            cache[key] = (spec, *build_pipeline(spec))
        else:
            set_global_switches(spec)
        return cache[key]

    return get
