"""The optional MLflow callback: each job of a sweep becomes one MLflow run holding its row."""

import json
import os
from pathlib import Path

import pytest

from conftest import FAST, ROOT, needs_packages, run_cli

needs_mlflow = needs_packages("mlflow", install='pip install -e ".[mlflow]"')


@needs_mlflow
def test_each_job_is_an_mlflow_run_with_its_spec_metrics_and_image(tmp_path):
    env = {"PYTHONPATH": str(ROOT)}  # run from another folder (the default store is ./mlruns there), on this code
    env_without_uri = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    sweep_dir = tmp_path / "sweep"
    out = run_cli("--multirun", f"hydra.sweep.dir={sweep_dir}", "hydra/callbacks=mlflow", *FAST,
                  "attention=sdpa,xformers", cwd=tmp_path, env={**env_without_uri, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "mlruns").is_dir()  # the default store, where the command ran

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("sdbuild")
    runs = {r.data.params["choice.attention"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["sdpa", "xformers"]
    rows = {json.loads(p.read_text())["choices"]["attention"]: json.loads(p.read_text())
            for p in sweep_dir.glob("*/result.json")}

    ok, refused = runs["sdpa"], runs["xformers"]
    row = rows["sdpa"]
    assert ok.info.status == "FINISHED" and ok.data.tags["sdbuild.status"] == "ok"
    assert ok.data.params["run.steps"] == "4" and ok.data.params["choice.precision"] == "fp32"
    assert ok.data.metrics["latency_median_s"] == pytest.approx(row["latency_s"]["median"])
    assert ok.data.metrics["peak_memory_mb"] == pytest.approx(row["peak_memory_mb"])
    assert json.loads(ok.data.tags["sdbuild.hardware"]) == row["job"]["hardware"]
    artifacts = {a.path for a in client.list_artifacts(ok.info.run_id)}
    assert artifacts == {"image.png", "result.json"}
    logged = Path(client.download_artifacts(ok.info.run_id, "image.png", str(tmp_path)))
    assert logged.read_bytes() == (sweep_dir / Path(row["job"]["output_dir"]).name / "image.png").read_bytes()

    assert refused.info.status == "FAILED" and refused.data.tags["sdbuild.status"] == "unsupported"
    assert "CUDA" in refused.data.tags["sdbuild.error"] and "latency_median_s" not in refused.data.metrics


@needs_mlflow
def test_tracking_uri_precedence(tmp_path, monkeypatch):
    from sdbuild.mlflow_callback import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, tmp_path) == (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(None, tmp_path) == "http://tracking:5000"
    assert tracking_uri("sqlite:///team.db", tmp_path) == "sqlite:///team.db"
