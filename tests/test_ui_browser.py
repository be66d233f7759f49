"""The MLflow UI as a person sees it: a real headless Chromium (Debian's, driven by Playwright)
opens `datamill ui`'s server after a small sweep with training, finds the parent and child
runs, a child's metrics and its loss-curve artifact, and saves screenshots to tests/artifacts/
(not committed). Needs /usr/bin/chromium and `pip install playwright` (.ci/run installs both
for the slow suite); skipped without them.

The README's picture comes from the same code on the quickstart's store:
    python tests/test_ui_browser.py examples/quickstart.yaml docs/
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]

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


def browse_sweep(uri: str, artifacts: Path, experiment: str, *, out_dir: Path, children: int) -> dict[str, Path]:
    """Open the MLflow UI on a finished sweep, as a user would, and screenshot three pages: the
    experiment's runs (the parent with its `children` nested), the first child's page (its name
    and a metric shown) and the child's loss-curve artifact. Returns name -> PNG path; raises
    (Playwright's timeout) when a page does not show what it should."""
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    from tracking.ui import start_server, stop_server

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("datamill.role") == "sweep")
    kids = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                  key=lambda r: r.info.start_time)
    assert len(kids) == children, [k.info.run_name for k in kids]
    child = kids[0]
    metric = next(m for m in sorted(child.data.metrics) if m.endswith(".loss"))
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = {name: out_dir / f"mlflow_ui_{name}.png" for name in ("experiment", "run", "artifacts")}
    server, url = start_server(uri, artifacts)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(f"{url}/#/experiments/{experiment_id}/runs")
            page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
            page.get_by_text(f"{children + 1} matching runs").first.wait_for(timeout=30_000)  # children nest under it
            close = page.get_by_role("button", name="Close")  # MLflow 3's assistant panel: not ours, hide it
            if close.count():
                close.first.click()
            page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # unfold the parent
            for kid in kids:
                page.get_by_text(kid.info.run_name, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots["experiment"]))

            page.goto(f"{url}/#/experiments/{experiment_id}/runs/{child.info.run_id}")
            page.get_by_text(child.info.run_name).first.wait_for(timeout=60_000)
            page.get_by_text(metric).first.wait_for(timeout=60_000)
            page.screenshot(path=str(shots["run"]))

            page.goto(f"{url}/#/experiments/{experiment_id}/runs/{child.info.run_id}/artifacts/"
                      f"{metric.split('.')[0]}/loss_curve.png")
            page.get_by_text("loss_curve.png").first.wait_for(timeout=60_000)
            page.screenshot(path=str(shots["artifacts"]))
            browser.close()
    finally:
        stop_server(server)
    return shots


def test_the_mlflow_ui_shows_the_sweep_its_metrics_and_the_loss_curve(write_spec, tmp_path_factory, monkeypatch):
    pytest.importorskip("playwright.sync_api")
    import datamill
    from datamill.run_tracking import tracking_target

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tmp_path_factory.mktemp("models")))
    result = datamill.run(write_spec(SPEC))
    uri, artifacts = tracking_target(result.points[0].plan)
    shots = browse_sweep(uri, artifacts, "ui_check", out_dir=ARTIFACTS, children=2)
    assert all(path.stat().st_size > 10_000 for path in shots.values())  # a rendered page, not a blank one


if __name__ == "__main__":  # the README's screenshot of a finished spec's sweep
    from datamill.api import plans
    from datamill.run_tracking import tracking_target

    spec, out = sys.argv[1], Path(sys.argv[2])
    first = plans(spec)
    uri, artifacts = tracking_target(first[0])
    name = first[0].resolved.spec.tracking.experiment or first[0].resolved.spec.name
    for path in browse_sweep(uri, artifacts, name, out_dir=out, children=len(first)).values():
        print(path)
