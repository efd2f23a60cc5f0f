"""The README's option and capability tables are the ones the code generates: docs can't drift."""

from sdbuild.capabilities import BEGIN, END, generated_docs
from conftest import ROOT


def test_readme_tables_match_the_code():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == generated_docs().strip(), "run: python -m sdbuild.capabilities --update README.md"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in (ROOT / "README.md").read_text() and "\npython -m pytest\n" in ci
