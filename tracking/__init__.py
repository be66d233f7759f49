"""MLflow integration: the only package that imports mlflow (core talks to `datamill.tracker.Tracker`).

- `params.flatten_params`: nested spec -> MLflow-safe flat params
- `mlflow_tracker.MlflowTracker`: the tracker the executor uses (entry point `datamill.trackers: mlflow`)
- `ui.serve` / `ui.start_server` / `ui.stop_server`: a local `mlflow server` for browsing results
"""
