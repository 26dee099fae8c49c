"""Where runs are recorded besides OUT/bakeoff.db: MLflow."""

from bakeoff.tracking.mlflow_tracking import experiment_name, log_run, require_mlflow

__all__ = ["experiment_name", "log_run", "require_mlflow"]
