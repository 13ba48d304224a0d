"""`looplm upcycle`: duplicate a checkpoint's layers (Ouro 1.4B -> 2.6B), the command-line side of model/upcycle.py.

    looplm upcycle runs/train-ouro-1.4b-stage1a/hf runs/train-ouro-1.4b-stage1a-upcycled-48l/hf --factor 2

The work, and what the upcycled model does and does not compute, is `looplm.model.upcycle.upcycle_layers`; this
module only parses the arguments, shows progress and prints the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from looplm.infra.registry import resolve_model_dir
from looplm.model.upcycle import upcycle_layers


def run_from_args(args: argparse.Namespace) -> int:
    """`looplm upcycle SRC DST [--factor 2] [--order stacked|interleaved]`."""
    from tqdm import tqdm

    with tqdm(total=0, unit="B", unit_scale=True, desc="upcycle") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        source = resolve_model_dir(args.src)  # a registered model is downloaded to a folder first
        target = upcycle_layers(source, args.dst, factor=args.factor, order=args.order, progress=progress)
    layers = json.loads((Path(target) / "config.json").read_text())["num_hidden_layers"]
    print(f"wrote {target}: {layers} layers ({args.order}, x{args.factor}) from {args.src}")
    return 0


__all__ = ["run_from_args"]
