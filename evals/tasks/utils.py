"""Rows of the datamill task family `name` for lm-eval (`custom_dataset: !function utils.load_split`).

Written by datagen/lm_eval_export.py. Reads data/<name>_<split>.jsonl next to this file, so the
folder works from any directory, with the `lm_eval` CLI (--include_path) and from Python.
"""

import json
from pathlib import Path


def load_split(name: str, **_metadata):
    import datasets

    splits = {}
    for split in ("test", "train"):
        path = Path(__file__).parent / "data" / f"{name}_{split}.jsonl"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f])
    return splits
