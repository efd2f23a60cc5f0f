"""Log every job's row to MLflow: one MLflow run per sdbuild job, with the spec as params, the
measurements as metrics, and the image and `result.json` as artifacts.

Optional (`pip install -e ".[mlflow]"`), switched on per command with `+hydra/callbacks=mlflow`
(conf/hydra/callbacks/mlflow.yaml). It is a Hydra callback, so it runs at the end of each job in the
job's own process, whichever launcher ran it (in-process, submitit local, SLURM). It only reads the
row the job wrote: sdbuild's results never depend on it, and an MLflow failure is a warning, never
a failed job.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("sdbuild")

RESULT = "result.json"  # the row's file name (sdbuild/job.py; sdbuild/results.py once it lands)
# Row fields logged as metrics, under these names: plain numbers, one value per job.
METRICS = {
    "latency_s.median": "latency_median_s", "latency_s.mean": "latency_mean_s", "latency_s.min": "latency_min_s",
    "latency_s.max": "latency_max_s", "latency_s.p90": "latency_p90_s", "latency_s.cv": "latency_cv",
    "warmup_s": "warmup_s", "load_s": "load_s", "build_s": "build_s", "peak_memory_mb": "peak_memory_mb",
    "warmup_peak_memory_mb": "warmup_peak_memory_mb", "peak_memory_reserved_mb": "peak_memory_reserved_mb",
    "steps_per_s": "steps_per_s", "job.wall_s": "wall_s",
}
MAX_PARAM = 6000  # MLflow's limit on a param value's length


def tracking_uri(configured: Optional[str], cwd: Path) -> str:
    """The store to log to: the configured URI, else $MLFLOW_TRACKING_URI, else a file store
    `mlruns/` in the folder the command was started from (no server or database needed)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or (cwd / "mlruns").resolve().as_uri()


def _flatten(data: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], data


def params_of(row: Dict[str, Any]) -> Dict[str, str]:
    """The resolved spec, flattened (`precision.unet_dtype`, `run.steps`, ...), plus the group choices
    (`choice.precision`): what a reader filters and compares runs by."""
    params = {key: "" if value is None else str(value)[:MAX_PARAM] for key, value in _flatten(row.get("spec") or {})}
    params.update({f"choice.{group}": str(option) for group, option in (row.get("choices") or {}).items()})
    return params


def metrics_of(row: Dict[str, Any]) -> Dict[str, float]:
    flat = dict(_flatten(row))
    return {name: float(flat[key]) for key, name in METRICS.items()
            if isinstance(flat.get(key), (int, float)) and not isinstance(flat.get(key), bool)}


def label_of(row: Dict[str, Any]) -> str:
    choices = row.get("choices") or {}
    return " ".join(f"{group}={option}" for group, option in choices.items()) or "sdbuild"


class MLflowCallback(Callback):
    """Hydra callback: after each job, one MLflow run holding that job's row."""

    def __init__(self, tracking_uri: Optional[str] = None, experiment: str = "sdbuild") -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        out_dir = Path(config.hydra.runtime.output_dir)
        if not (out_dir / RESULT).exists():
            log.warning("mlflow: no %s in %s, nothing logged", RESULT, out_dir)
            return
        try:
            run_id = self.log_row(out_dir, tracking_uri(self.tracking_uri, Path(config.hydra.runtime.cwd)))
            log.info("mlflow: logged %s as run %s", out_dir, run_id)
        except Exception as exc:  # the row is on disk; a tracking server being down must not fail the job
            log.warning("mlflow: could not log %s (%s: %s)", out_dir, type(exc).__name__, exc)

    def log_row(self, out_dir: Path, uri: str) -> str:
        """Log the row in `out_dir` to the store at `uri`; return the MLflow run id."""
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the file store behind an opt-in; it is sdbuild's serverless default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        row = json.loads((out_dir / RESULT).read_text())
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment)
            except MlflowException:  # another job of the sweep created it first
                experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        job = row.get("job") or {}
        tags = {"sdbuild.status": row.get("status"), "sdbuild.error": (row.get("error") or "")[:MAX_PARAM],
                "sdbuild.spec_key": row.get("spec_key"), "sdbuild.output_dir": str(out_dir),
                "sdbuild.launcher": job.get("launcher"), "sdbuild.preset": row.get("preset"),
                "sdbuild.device": (row.get("env") or {}).get("device_name")}
        run = client.create_run(experiment_id, run_name=label_of(row),
                                tags={k: str(v) for k, v in tags.items() if v is not None})
        run_id = run.info.run_id
        stamp = run.info.start_time
        params = [Param(key, value) for key, value in params_of(row).items()]
        client.log_batch(
            run_id,
            metrics=[Metric(name, value, stamp, 0) for name, value in metrics_of(row).items()],
            tags=[RunTag("sdbuild.hardware", json.dumps(job.get("hardware"))[:MAX_PARAM])] if job.get("hardware") else [],
        )
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[start:start + 100])
        client.log_artifact(run_id, str(out_dir / RESULT))
        if row.get("image") and (out_dir / row["image"]).exists():
            client.log_artifact(run_id, str(out_dir / row["image"]))
        client.set_terminated(run_id, status="FINISHED" if row.get("status") == "ok" else "FAILED")
        return run_id
