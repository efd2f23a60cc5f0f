"""The docs hold: the option tables are the ones the code generates, every relative link resolves,
the README is a landing page whose quick start is what CI runs, and its cheap commands run."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdbuild.capabilities import BEGIN, END, generated_docs
from conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|^\[[^\]]+\]:\s*(\S+)", re.M)


def test_option_tables_match_the_code():
    options = (ROOT / "docs" / "options.md").read_text()
    block = options.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == generated_docs().strip(), "run: python -m sdbuild.capabilities --update docs/options.md"


def slug(heading: str) -> str:
    """A Markdown heading's anchor, as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def relative_links(path: Path) -> list:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # not inside code blocks
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    for link in links:
        target, _, anchor = link.partition("#")
        resolved = (page.parent / target).resolve() if target else page
        assert resolved.exists(), f"{page.name}: {link} -> {resolved} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: {link}: no heading #{anchor} in {resolved.name}"


def test_the_link_check_sees_links():
    """The checker itself: it finds inline and reference links, and ignores code and URLs."""
    page = ROOT / "README.md"
    assert "docs/options.md" in relative_links(page) and "BENCHMARKS.md" in relative_links(page)
    assert slug("Overheads (CPU, same machine)") == "overheads-cpu-same-machine"
    assert slug("The `row`: what it says") == "the-row-what-it-says"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in relative_links(README)}
    assert not [page.name for page in DOCS if page.resolve() not in linked]


def test_the_readme_is_a_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) < 150, len(lines)
    assert not [n for n, line in enumerate(lines, 1) if len(line) > 100]
    assert "the seed" not in README.read_text().lower()


def quick_start_blocks() -> list:
    """The commands of the fenced blocks under the README's "Quick start" heading, in order."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [[line.split("  #")[0].strip() for line in block.splitlines() if line.strip()] for block in blocks]


def test_the_quick_start_is_what_ci_runs_first():
    """CI's first pass is the quick start's install block, word for word and in order."""
    install = quick_start_blocks()[0]
    ci = (ROOT / ".ci" / "run").read_text()
    first_pass = ci.split("# --- pass 1", 1)[1].split("# --- pass 2", 1)[0]
    commands = [line for line in first_pass.splitlines()[1:] if line.strip() and not line.startswith("#")]
    assert commands == install == ['pip install torch==2.13.0 && pip install -e ".[test]"', "python -m pytest"]


def test_pytest_shows_skip_reasons():
    import tomllib

    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "-rs" in addopts.split()


def run_as_written(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A quick-start command, word for word, in `cwd`, with this interpreter's scripts on PATH."""
    script = Path(sys.executable).parent / "sdbuild"
    if not script.exists() and not shutil.which("sdbuild"):
        pytest.skip("the `sdbuild` console script is not installed (pip install -e .)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    argv = shlex.split(command)
    argv = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{command}: {out.stderr[-2000:]}"
    return out


def test_the_quick_start_names_the_default_job_and_the_console_script():
    assert quick_start_blocks()[1] == ["python -m sdbuild", "sdbuild --help"]


def test_the_quick_start_console_script_runs(tmp_path):
    out = run_as_written(quick_start_blocks()[1][1], tmp_path)
    assert out.stdout.startswith("sdbuild: declarative, measured diffusion pipelines.")


@pytest.mark.slow  # the default job word for word: 50 steps, 4 calls (seconds on a quiet machine, minutes loaded)
def test_the_quick_start_default_job_runs(tmp_path):
    out = run_as_written(quick_start_blocks()[1][0], tmp_path)
    assert "median" in out.stdout and list(tmp_path.glob("outputs/runs/*/result.json")), out.stdout


def test_no_tracked_file_holds_a_merge_conflict_marker():
    """A conflict left in a docs page outside the generated tables once landed on main unseen."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    marked = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".md", ".py", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg"} or not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines()
        marked += [f"{name}:{i}" for i, line in enumerate(lines, 1)
                   if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="]
    assert not marked, marked
