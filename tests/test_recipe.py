"""The build order has one owner: builder.STEPS. The dry run prints its steps, the builder runs
them, and nothing in builder.py reaches a lever except through a step; the package has no import
circle, and the families and levers live one to a module."""

import ast
import re
import sys
from pathlib import Path

import pytest

import sdbuild
from sdbuild import builder, dryrun
from sdbuild.builder import STEPS, build_pipeline

from conftest import FAST, ROOT

PACKAGE = ROOT / "sdbuild"

# Each family's tiny model with options that take every step down a path of its own (pins,
# fused QKV, channels-last, slicing, layerwise casting, a cache, a trace or a compile).
SPECS = {
    "sd15": ["attention=sdpa_fused", "memory_format=channels_last", "memory=vae_slicing", "compile=trace"],
    "sdxl": ["model=tiny_sdxl", "attention=sdpa_math", "memory=layerwise_fp8"],
    "flux": ["model=tiny_flux", "cache=first_block", "compile=inductor"],
    "sd3": ["model=tiny_sd3", "memory=vae_tiling"],
}


def planned_steps(spec) -> list[str]:
    """The step names of the dry run's printed plan, in its order (its numbered lines)."""
    return [m.group(1) for line in dryrun.plan(spec, "cpu") if (m := re.match(r"\d+\. ([^:]+):", line))]


def lever_calls_from_builder(spec):
    """Every call builder.py makes into a function of sdbuild/levers/, in order, while it builds."""
    levers = str(PACKAGE / "levers")
    here = str(PACKAGE / "builder.py")
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(levers) and frame.f_back is not None \
                and frame.f_back.f_code.co_filename == here:
            calls.append(frame.f_code)

    sys.setprofile(profile)
    try:
        _, info = build_pipeline(spec, "cpu")
    finally:
        sys.setprofile(None)
    return calls, info


@pytest.mark.parametrize("family", list(SPECS))
def test_the_dry_run_plans_exactly_the_steps_the_builder_runs(family):
    spec = sdbuild.compose([*FAST, *SPECS[family]])
    calls, info = lever_calls_from_builder(spec)
    assert planned_steps(spec) == info.steps == [step.name for step in STEPS]
    # ...and the builder changes the pipeline only through those steps: one lever call per step, in order
    assert calls == [step.apply.__code__ for step in STEPS], [c.co_name for c in calls]


def test_the_dry_run_numbers_the_builders_steps_and_nothing_else():
    spec = sdbuild.compose(["compile=inductor", "memory=model_offload"])
    lines = dryrun.plan(spec, "cpu")
    numbered = [line for line in lines if re.match(r"\d+\. ", line)]
    assert numbered == [f"{i}. {name}: {what}" for i, (name, what) in enumerate(builder.plan_steps(spec, "cpu"), 1)]
    assert lines[0].startswith("device: cpu") and lines[-1].startswith("run: ")
    assert numbered.index(next(line for line in numbered if ". place:" in line)) > \
        numbered.index(next(line for line in numbered if ". attention:" in line))  # places after attention


def test_every_step_names_a_lever_module_pair():
    """A step's apply and describe live in the same sdbuild/levers/ module: one room per lever."""
    for step in STEPS:
        assert step.apply.__module__.startswith("sdbuild.levers."), step
        assert step.apply.__module__ == step.describe.__module__, step


def _imports(path: Path) -> set[str]:
    """The sdbuild modules `path` imports (top level or inside functions), resolved to dotted names."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("sdbuild"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)  # `from . import flux`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sdbuild"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in _imports(path) if t in modules and t != name} for name, path in modules.items()}


def test_the_package_has_no_import_circle():
    graph = import_graph()
    # a package's __init__ importing its own modules is how a package is made, not a circle of the code's
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state, cycle = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycle == [], cycle


def test_models_imports_no_family_module_and_no_family_imports_models():
    graph = import_graph()
    assert not {m for m in graph["sdbuild.models"] if m.startswith("sdbuild.families.")}, graph["sdbuild.models"]
    for name, targets in graph.items():
        if name.startswith("sdbuild.families"):
            assert "sdbuild.models" not in targets and not any(t.startswith("sdbuild.levers") for t in targets), name


def test_every_family_has_its_module_and_builds_its_own_random_models():
    from sdbuild.families import FAMILIES
    from sdbuild.spec import ModelFamily

    for family in ModelFamily:
        record = FAMILIES[family]
        assert record.build_random.__module__ == f"sdbuild.families.{family.name}"
        assert f"tiny-{family.name}" in record.random_models and f"{family.name}-arch" in record.random_models


def test_the_builder_holds_the_recipe_only():
    source = (PACKAGE / "builder.py").read_text()
    assert len(source.splitlines()) < 200
    assert "import torch" not in source  # every lever's torch work is in its own module
