"""`looplm upcycle`: duplicate a checkpoint's layers (Ouro 1.4B -> 2.6B), the command-line side of model/upcycle.py.

    looplm upcycle runs/train-ouro-1.4b-stage1a/hf runs/train-ouro-1.4b-stage1a-upcycled-48l/hf --factor 2

The work, and what the upcycled model does and does not compute, is `looplm.model.upcycle.upcycle_layers`; this
module only parses the arguments, checks them before the progress bar starts (so that a bad argument is one line
on stderr, not a line under an empty bar), shows progress and prints the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from looplm.infra.configs import PathError
from looplm.infra.mlflow_server import check_tracking_server
from looplm.infra.registry import is_model_uri, resolve_model_dir
from looplm.model.atomic import check_free_folder
from looplm.model.checkpoint import check_weights, load_config
from looplm.model.upcycle import UPCYCLE_TARGET, layer_map, upcycle_layers


def check_arguments(args: argparse.Namespace) -> Path:
    """The upcycling arguments, checked before any work: the factor and order, a free destination, and a source
    folder with a readable config.json and readable weight files. Returns the source folder (a registered model is
    downloaded first)."""
    layer_map(1, args.factor, args.order)  # ConfigError for a factor below 2 or an unknown order
    try:
        check_free_folder(Path(args.dst), UPCYCLE_TARGET)
    except FileExistsError as err:
        raise PathError(str(err)) from None
    if is_model_uri(args.src):
        check_tracking_server()  # a dead server is one line now, not MLflow's retries then a traceback
    source = resolve_model_dir(args.src)
    load_config(source)  # CheckpointError naming config.json when it is missing or not an Ouro config
    check_weights(source)  # names a weight file that is missing or cut short
    return source


def run_from_args(args: argparse.Namespace) -> int:
    """`looplm upcycle SRC DST [--factor 2] [--order stacked|interleaved]`."""
    from tqdm import tqdm

    source = check_arguments(args)
    with tqdm(total=0, unit="B", unit_scale=True, desc="upcycle") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        target = upcycle_layers(source, args.dst, factor=args.factor, order=args.order, progress=progress)
    layers = json.loads((Path(target) / "config.json").read_text())["num_hidden_layers"]
    print(f"wrote {target}: {layers} layers ({args.order}, x{args.factor}) from {args.src}")
    return 0


__all__ = ["check_arguments", "run_from_args"]
