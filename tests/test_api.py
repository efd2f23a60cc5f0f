"""The Python API works as docs/sweeps-and-reports.md shows, any number of times per process, and `sdbuild.run`
returns the very row the CLI writes for the same spec."""

import json

import sdbuild

from conftest import FAST, run_cli

OVERRIDES = ["precision=fp32", "attention=sdpa", *FAST]


def test_build_works_twice_in_one_process():
    import sdbuild.builder  # noqa: F401  (importing the module must not replace the function)

    spec = sdbuild.compose(OVERRIDES)
    first, second = sdbuild.build(spec), sdbuild.build(spec)
    assert callable(sdbuild.build)
    assert type(first).__name__ == type(second).__name__ == "StableDiffusionPipeline"
    assert first is not second and type(first.unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]).__name__ == "AttnProcessor2_0"


def test_run_twice_returns_the_rows_it_writes(tmp_path):
    spec = sdbuild.compose(OVERRIDES)
    rows = [sdbuild.run(spec, tmp_path / name) for name in ("a", "b")]
    for name, row in zip(("a", "b"), rows):
        assert row["status"] == "ok", row["error"]
        assert json.loads((tmp_path / name / "result.json").read_text()) == json.loads(json.dumps(row, default=str))
        assert (tmp_path / name / row["image"]).exists()
    assert rows[0]["spec_key"] == rows[1]["spec_key"]
    assert rows[0]["choices"]["attention"] == "sdpa" and rows[0]["choices"]["model"] == "tiny"


def test_run_defaults_to_a_new_folder_under_outputs_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = sdbuild.compose(OVERRIDES)
    first, second = sdbuild.run(spec), sdbuild.run(spec)
    folders = {first["job"]["output_dir"], second["job"]["output_dir"]}
    assert len(folders) == 2
    for folder in folders:
        assert (tmp_path / folder).parent == tmp_path / "outputs" / "runs"
        assert (tmp_path / folder / "result.json").exists()
    assert sdbuild.new_run_dir() != sdbuild.new_run_dir()  # two runs within one second get two folders


def test_run_returns_the_row_the_cli_writes(tmp_path):
    cli = run_cli(*OVERRIDES, f"hydra.run.dir={tmp_path / 'cli'}")
    assert cli.returncode == 0, cli.stderr
    cli_row = json.loads((tmp_path / "cli" / "result.json").read_text())
    api_row = sdbuild.run(sdbuild.compose(OVERRIDES), tmp_path / "api")
    assert api_row.keys() == cli_row.keys()
    for field in ("status", "spec", "spec_key", "choices", "preset", "image_stats"):
        assert api_row[field] == cli_row[field], field  # the same pipeline, the same pixels
    assert api_row["job"].keys() == cli_row["job"].keys()


def test_run_refuses_like_the_cli(tmp_path):
    row = sdbuild.run(sdbuild.compose(["precision=fp16", "run.device=cpu", *FAST]), tmp_path)
    assert row["status"] == "unsupported" and "precision=fp16" in row["error"] and row["load_s"] is None
