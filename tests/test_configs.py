"""Every config composes into a typed spec; wrong values fail at composition; composing is light."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ValidationError

import sdbuild
from sdbuild.config import config_dir
from sdbuild.spec import GROUPS, Dtype, MemoryFormat, Spec

CONF = Path(config_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    spec = sdbuild.compose([f"{group}={option}"])
    assert isinstance(spec, Spec)
    assert getattr(spec, group).name == option  # each file says which option it is


def test_defaults_are_the_seed_baseline():
    spec = sdbuild.compose()
    assert spec.precision.dtype is Dtype.fp32 and not spec.precision.tf32
    assert spec.memory_format.format is MemoryFormat.contiguous
    assert spec.attention.name == "classic" and spec.compile.name == "none"
    assert spec.model.name == "tiny" and spec.scheduler.name == "ddim"
    assert spec.run.steps == 50 and spec.run.prompt == "a photo of an astronaut riding a horse on mars"


def test_field_override_is_typed():
    spec = sdbuild.compose(["run.steps=7", "run.height=128", "precision.tf32=true"])
    assert spec.run.steps == 7 and spec.run.height == 128 and spec.precision.tf32 is True


@pytest.mark.parametrize("override", ["precision=fp8", "precision.dtype=fp8", "run.steps=many", "run.nonsense=1"])
def test_wrong_value_fails_at_composition(override):
    with pytest.raises((ConfigCompositionException, HydraException, ValidationError)):
        sdbuild.compose([override])


def test_cli_wrong_option_lists_the_choices():
    out = subprocess.run([sys.executable, "-m", "sdbuild", "precision=fp8"], capture_output=True, text=True,
                         cwd=CONF.parent)
    assert out.returncode == 2  # a user's mistake, refused before anything runs
    assert "precision=fp8" in out.stderr and "fp16" in out.stderr  # names the option and lists the group's
    assert "Traceback" not in out.stderr


def test_compose_and_help_do_not_import_torch():
    code = ("import sys, sdbuild; sdbuild.compose(['precision=bf16']); "
            "heavy = [m for m in ('torch', 'diffusers', 'xformers', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CONF.parent)
    code = ("import sys, runpy; sys.argv = ['sdbuild', '--help']\n"
            "try:\n runpy.run_module('sdbuild', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CONF.parent, capture_output=True)


def test_installed_package_carries_its_configs(tmp_path):
    """Run from outside the checkout: the installed sdbuild (a wheel in CI) finds its own conf/."""
    out = subprocess.run([sys.executable, "-m", "sdbuild", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for group in GROUPS:
        assert f"{group}:" in out.stdout
    assert "precision: bf16, bf16_vae32, fp16" in out.stdout


def compose_with_hydra(overrides):
    """The full composed config, `hydra` node included (where an experiment keeps its sweep)."""
    from hydra import compose, initialize_config_dir

    from sdbuild.spec import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


PRESETS = sorted(p.stem for p in (CONF / "preset").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes(preset):
    """A preset that names an option or a field that does not exist fails here, not in a user's sweep."""
    spec = sdbuild.compose([f"+preset={preset}"])
    assert spec.preset == preset and spec.preset_order is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_every_job(experiment):
    """Each experiment composes, and so does every job of its sweep (each value of each swept key)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_with_hydra([f"+experiment={experiment}"])
    params = cfg.hydra.sweeper.params
    assert params, f"experiment={experiment} sweeps nothing"
    parser = OverridesParser.create()
    jobs = 0
    for override in parser.parse_overrides([f"{key}={value}" for key, value in params.items()]):
        for value in override.sweep_string_iterator():
            spec = sdbuild.compose([f"+experiment={experiment}", f"{override.get_key_element()}={value}"])
            assert isinstance(spec, Spec)
            jobs += 1
    assert jobs >= 2


def test_spec_identity_ignores_only_how_a_run_is_stored():
    from sdbuild.spec import spec_key, spec_to_dict

    def key(*overrides):
        return spec_key(spec_to_dict(sdbuild.compose(list(overrides))))

    base = key()
    assert len(base) == 16 and int(base, 16) >= 0 and base == key()
    for same in ["resume=/some/sweep", "cache_dir=/tmp/x", "isolate=true"]:
        assert key(same) == base, same
    stored = spec_to_dict(sdbuild.compose())
    assert spec_key({**stored, "preset": "cpu_fp32", "preset_order": 3}) == base
    for different in ["run.steps=7", "precision=bf16", "run.seed=1", "run.negative_prompt=x", "compile.fullgraph=true"]:
        assert key(different) != base, different


def test_spec_to_dict_writes_enums_by_name():
    from sdbuild.spec import spec_to_dict

    d = spec_to_dict(sdbuild.compose(["precision=bf16", "compile=inductor_max_autotune"]))
    assert d["precision"]["dtype"] == "bf16" and d["compile"]["mode"] == "max_autotune"
    assert d["compile"]["targets"] == ["unet"] and d["run"]["negative_prompt"] is None


def test_to_spec_drops_the_hydra_node():
    from omegaconf import OmegaConf

    from sdbuild.spec import to_spec

    cfg = compose_with_hydra(["run.steps=3"])
    assert "hydra" in cfg
    spec = to_spec(cfg)
    assert isinstance(spec, Spec) and spec.run.steps == 3
    assert to_spec(OmegaConf.create({"run": {"steps": 5}})).run.steps == 5  # a bare config too


def test_spec_identity_does_not_depend_on_key_order():
    from sdbuild.spec import spec_key, spec_to_dict

    stored = spec_to_dict(sdbuild.compose(["precision=bf16"]))
    reordered = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v) for k, v in reversed(list(stored.items()))}
    assert list(reordered) != list(stored) and spec_key(reordered) == spec_key(stored)
