"""Architecture rules users feel: light imports for fast commands, stages that don't import each other."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["datagen", "selection", "train", "evals", "tracking"]
HEAVY = ["torch", "transformers", "mlflow", "polars", "accelerate", "peft", "lm_eval", "datasets", "ray"]


def imported_modules(py: Path) -> set[str]:
    tree = ast.parse(py.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_stage_packages_do_not_import_each_other():
    for stage in STAGES:
        for py in (ROOT / stage).rglob("*.py"):
            others = imported_modules(py) & (set(STAGES) - {stage})
            assert not others, f"{py.relative_to(ROOT)} imports {others}: stages meet through datamill core"


def test_only_tracking_imports_mlflow():
    for py in list((ROOT / "datamill").rglob("*.py")) + [p for s in STAGES if s != "tracking" for p in (ROOT / s).rglob("*.py")]:
        assert "mlflow" not in imported_modules(py), f"{py.relative_to(ROOT)} imports mlflow"


def test_validating_and_planning_the_examples_imports_nothing_heavy(write_spec):
    # the quickstart has every heavy kind (generate, select, train, evaluate) and a sweep; the
    # cleaning tour has polars (user code) and dedup
    spec = write_spec((ROOT / "examples" / "quickstart.yaml").read_text())
    shutil.copytree(ROOT / "examples" / "prompts", spec.parent / "prompts")
    clean = spec.parent / "clean.yaml"
    clean.write_text((ROOT / "examples" / "clean.yaml").read_text().replace("path: data/", f"path: {ROOT}/examples/data/"))
    (spec.parent / "transforms.py").write_text((ROOT / "examples" / "transforms.py").read_text())
    code = f"""
import sys
from datamill.api import plans
from datamill.plan import describe
for path in ({str(spec)!r}, {str(clean)!r}):
    for p in plans(path):
        describe(p)
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print(heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    out = subprocess.run([sys.executable, "-c", "import sys, datamill.cli; print([m for m in %r if m in sys.modules])" % HEAVY],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

