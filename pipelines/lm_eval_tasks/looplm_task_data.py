"""Data loader for looplm's bundled lm-eval tasks: JSON-lines files beside this module, read with no download.

The task YAMLs name it as `custom_dataset: !function looplm_task_data.load_jsonl` with the file in
`dataset_kwargs.data_file`; lm-eval calls it with those kwargs plus the task's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file: str, split: str = "test", **_: Any) -> datasets.DatasetDict:
    """One split from a JSON-lines file; a relative path is taken relative to this folder."""
    path = Path(data_file)
    path = path if path.is_absolute() else HERE / path
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task data {path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
