"""The MLflow UI as a person sees it: a real headless Chromium (Debian's, driven by Playwright)
opens `datamill ui`'s server after a small sweep with training, finds the parent and child
runs, a child's metrics and its loss-curve artifact, and saves a screenshot to
tests/artifacts/ (not committed). Needs /usr/bin/chromium and `pip install playwright`
(.ci/run installs both for the slow suite); skipped without them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium (apt-get install chromium)"),
]

SPEC = """
name: ui_check
models: {tiny: builtin:tiny-llama}
sources:
  rows: {generator: tasks, families: [capitals, arithmetic], n: 24, seed: 0}
steps:
  sft: {train: {model: tiny, data: rows, max_steps: 3, max_len: 64, lora: {r: 4}, log_every: 1}}
sweep:
  steps.sft.train.lr: [0.01, 0.001]
"""


def test_the_mlflow_ui_shows_the_sweep_its_metrics_and_the_loss_curve(write_spec, tmp_path_factory, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    import datamill
    from datamill.executor import tracking_target
    from tracking.ui import start_server, stop_server

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tmp_path_factory.mktemp("models")))
    spec = write_spec(SPEC)
    result = datamill.run(spec)
    uri, artifacts = tracking_target(result.points[0].plan)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ui_check").experiment_id
    child = result.points[0].run_id
    server, url = start_server(uri, artifacts)
    ARTIFACTS.mkdir(exist_ok=True)
    browser_args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=browser_args)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/#/experiments/{experiment}/runs")
            page.get_by_text("ui_check (sweep of 2)").first.wait_for(timeout=60_000)  # the parent run
            page.get_by_text("3 matching runs").first.wait_for(timeout=30_000)  # the children nest under it
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_experiment.png"))

            page.goto(f"{url}/#/experiments/{experiment}/runs/{child}")
            page.get_by_text("lr=0.01").first.wait_for(timeout=60_000)  # the child's name
            page.get_by_text("sft.loss").first.wait_for(timeout=60_000)  # one of its metrics
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_run.png"))

            page.goto(f"{url}/#/experiments/{experiment}/runs/{child}/artifacts/sft/loss_curve.png")
            page.get_by_text("loss_curve.png").first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_artifacts.png"))
            browser.close()
    finally:
        stop_server(server)
