"""Experiment tracking: a run mirrored to MLflow.

Optional (MLflow is imported only when tracking is on), so it lives outside the run itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lungscreen.errors import ConfigError
from lungscreen.training.config import TrainConfig, to_raw
from lungscreen.training.run_context import is_finite
from lungscreen.training.run_folder import read_json, write_json


class MlflowTracker:
    """Logs a run to MLflow (parameters once, each epoch's figures, the summary and best.pt at the end).

    MLflow is an optional dependency (the ``dev`` extra), imported only when tracking is on. The MLflow
    run id is kept in the run folder, so a resumed run continues the same MLflow run.
    """

    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError("tracking.mlflow: MLflow is not installed (pip install 'lungscreen[dev]' or mlflow)") from None
        self.client = mlflow.MlflowClient(tracking_uri=config.tracking.uri)
        self.run_dir = run_dir
        id_file = run_dir / "mlflow.json"
        if id_file.exists():
            self.run_id = read_json(id_file)["run_id"]
            return
        experiment = self.client.get_experiment_by_name(config.tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.tracking.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        write_json(id_file, {"run_id": self.run_id, "uri": config.tracking.uri})
        from mlflow.entities import Param

        raw = to_raw(config)
        raw.pop("tune", None)  # the search space is not a parameter of this run
        params = [Param(re.sub(r"[^\w\-. /]", "_", key), str(value)[:500]) for key, value in _flatten(raw).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_epoch(self, row: dict[str, Any]) -> None:
        step = int(row["run_epoch"])
        for key, value in row.items():
            if isinstance(value, (int, float)) and is_finite(value) and key not in ("stage", "epoch", "run_epoch"):
                self.client.log_metric(self.run_id, key, float(value), step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        for name, estimate in (summary.get("test") or {}).get("figures", {}).items():
            if is_finite(estimate["value"]):
                self.client.log_metric(self.run_id, f"test/{name}", float(estimate["value"]))
        for artifact in ("metrics.csv", "summary.json", "config.yaml"):
            if (self.run_dir / artifact).exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / artifact))
        self.client.set_terminated(self.run_id)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}.{index}"))
        return out
    return {prefix: value}
