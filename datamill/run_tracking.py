"""What a run logs to its tracker, and where: the tracking store of a spec, the experiment, each
run's params, tags and resolved spec, and whether an unchanged re-run's results are logged already.

The executor opens one run per point and, for a sweep, a parent run; `run_fields` gives each the
fields `Tracker.start_run` takes. Everything is redacted before it leaves (`datamill.secrets`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from datamill.plan import Plan
from datamill.secrets import redact_config, scrub
from datamill.tracker import NullTracker


def tracking_target(plan: Plan) -> tuple[str, Path]:
    """(tracking URI, local artifact root): the spec's, else $MLFLOW_TRACKING_URI, else a
    sqlite store next to the workspace."""
    import os

    root = plan.workspace.root.parent
    uri = plan.resolved.spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    return uri, root / "mlartifacts"


def make_tracker(plan: Plan):
    if not plan.resolved.spec.tracking.enabled:
        return NullTracker()
    from datamill.registry import tracker_class

    return tracker_class(plan.resolved.spec.tracking.tracker)(*tracking_target(plan))


def experiment_name(plan: Plan) -> str:
    return plan.resolved.spec.tracking.experiment or plan.resolved.spec.name


def is_sweep(plans: list[Plan]) -> bool:
    """Whether the run gets a sweep's parent run: several points, or one point of a sweep."""
    return len(plans) > 1 or bool(plans[0].resolved.point)


# An unchanged re-run reuses every step; logging it again would only add copies of the same
# runs to MLflow. Each run carries a digest of what it logged (DIGEST_TAG: the experiment, spec,
# point and every step's key; a sweep's parent: its points'), so a re-run whose steps are all
# cached asks the store for FINISHED runs with its digests (Tracker.find_runs: a query; on a
# sqlite store without starting MLflow, which takes seconds) and reuses them. Runs deleted since
# are not found: the results are logged again.

DIGEST_TAG = "datamill.digest"


def _point_digest(plan: Plan) -> str:
    from datamill.hashing import hash_obj

    return hash_obj([experiment_name(plan), plan.resolved.spec.name, plan.resolved.label,
                     [(s.name, s.key) for s in plan.steps]])


def sweep_digest(plans: list[Plan]) -> str:
    from datamill.hashing import hash_obj

    return hash_obj([experiment_name(plans[0]), [_point_digest(p) for p in plans]])


def logged_before(plans: list[Plan], tracker) -> tuple[str, list[str]] | None:
    """(the run id, each point's run id) of runs in the store that already hold exactly what
    this run would log, or None (then it logs)."""
    ws = plans[0].workspace
    if not all(ws.is_cached(s.key) for p in plans for s in p.steps):
        return None
    experiment = experiment_name(plans[0])
    if not is_sweep(plans):
        found = tracker.find_runs(experiment, {DIGEST_TAG: _point_digest(plans[0]), "datamill.role": "run"})
        return (found[0][0], [found[0][0]]) if found else None
    digests = [_point_digest(p) for p in plans]
    for parent, _ in tracker.find_runs(experiment, {DIGEST_TAG: sweep_digest(plans), "datamill.role": "sweep"}):
        children = {tags.get(DIGEST_TAG): run_id
                    for run_id, tags in tracker.find_runs(experiment, {"mlflow.parentRunId": parent})}
        if all(d in children for d in digests):  # a child deleted since: not this parent
            return parent, [children[d] for d in digests]
    return None


# --------------------------------------------------------------------------- what MLflow gets


SWEPT = "(swept: see sweep)"


def run_fields(plan: Plan, role: str, digest: str | None = None) -> dict:
    """`params`, `tags` and `spec_yaml` of a run, for `Tracker.start_run`. `role`: "run" (no
    sweep), "point" (a sweep's child) or "sweep" (its parent: `digest` is then `sweep_digest`)."""
    sweep = role == "sweep"
    return {"params": _params(plan, sweep), "tags": _tags(plan, role, digest), "spec_yaml": _spec_yaml(plan, sweep)}


def _dump(plan: Plan, sweep: bool = False) -> dict:
    """The resolved spec; for a sweep's parent, the swept fields say so instead of showing the
    first point's values (the parent is every point)."""
    data = redact_config(plan.resolved.spec.model_dump(mode="json", exclude_none=True))
    if sweep:
        for dotted in plan.resolved.point:
            *parents, last = str(dotted).split(".")
            node = data
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and last in node:
                node[last] = SWEPT
    return data


def _params(plan: Plan, sweep: bool = False) -> dict:
    params = _dump(plan, sweep)
    params.pop("sweep", None)
    if sweep:
        params["sweep"] = redact_config(plan.resolved.raw.get("sweep") or {})
    else:
        params.update({f"point.{k}": v for k, v in plan.resolved.point.items()})
    return params


def _spec_yaml(plan: Plan, sweep: bool = False) -> str:
    import yaml

    data = _dump(plan, sweep)
    if sweep:
        data["sweep"] = redact_config(plan.resolved.raw.get("sweep") or {})
    return scrub(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _tags(plan: Plan, role: str, digest: str | None = None) -> dict[str, str]:
    """A run's tags; `digest`: what the run holds (DIGEST_TAG), by default this plan's point."""
    from datamill import __version__

    tags = {"datamill.spec": plan.resolved.spec.name, "datamill.version": __version__, "datamill.role": role,
            "datamill.spec_file": str(plan.resolved.path.resolve()), "datamill.workspace": str(plan.workspace.root),
            DIGEST_TAG: digest or _point_digest(plan)}
    if plan.resolved.label and role != "sweep":  # a sweep's parent is all of its points, not the first
        tags["datamill.point"] = plan.resolved.label
    if plan.resolved.spec.description:
        tags["mlflow.note.content"] = plan.resolved.spec.description
    commit = _git_commit(plan.resolved.env.base_dir)
    if commit:
        tags["datamill.git_commit"] = commit
    return tags


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
