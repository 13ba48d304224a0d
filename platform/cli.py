"""The `looplm` command: one subcommand per thing a user runs.

    looplm demo                       the embedded end-to-end demo (what `make demo` runs)
    looplm run EXPERIMENT [k=v ...]   run an experiment's steps through the executor (--dry-run, --force, --until)
    looplm status EXPERIMENT [k=v]    each step's state (done, running, unfinished, not run) and output folder
    looplm curate CONFIG [k=v ...]    curate raw text into Megatron indexed datasets (Ray Data)
    looplm train CONFIG [k=v ...]     pretrain on megatron-core, launched on Ray Train
    looplm eval CONFIG [k=v ...]      evaluate a checkpoint or registered model, tracked in MLflow
    looplm register MODEL NAME        a checkpoint folder as a new version of NAME in the MLflow model registry
    looplm upcycle SRC DST            duplicate a checkpoint's layers (Ouro 1.4B -> 2.6B; --factor, --order)
    looplm mlflow                     start an MLflow tracking server on 127.0.0.1
    looplm serve MODEL                serve a checkpoint or models:/ URI on Ray Serve (OpenAI API, 127.0.0.1:8000)

Each subcommand imports its module only when it runs, so `looplm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, function, help). The function takes the parsed argparse namespace.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("looplm.platform.demo", "run_from_args", "run the embedded end-to-end demo"),
    "run": ("looplm.platform.experiment", "run_from_args", "run an experiment through the step executor"),
    "status": ("looplm.platform.experiment", "status_from_args", "show each step of an experiment: done or not"),
    "curate": ("looplm.pipelines.curate", "run_from_args", "curate raw text into Megatron indexed datasets"),
    "train": ("looplm.pipelines.pretrain", "run_from_args", "pretrain on megatron-core via Ray Train"),
    "eval": ("looplm.pipelines.evaluate", "run_from_args", "evaluate a checkpoint or registered model"),
    "register": ("looplm.pipelines.register", "run_from_args", "register a checkpoint folder in the MLflow registry"),
    "upcycle": ("looplm.pipelines.upcycle", "run_from_args", "duplicate a checkpoint's layers (1.4B -> 2.6B)"),
    "mlflow": ("looplm.infra.mlflow_server", "run_from_args", "start an MLflow tracking server on 127.0.0.1"),
    "serve": ("looplm.serving.app", "run_from_args", "serve a model on Ray Serve with an OpenAI-compatible API"),
}
WITH_CONFIG = {"curate", "train", "eval", "run", "status"}
# Errors that mean the input is wrong (a config, a file, a URI, a server address), by module and class: looked up in
# sys.modules when one is raised, so recognising them imports nothing. They print one line and exit 2; anything
# else is a bug and keeps its traceback. `--debug` shows the traceback of any error.
USER_ERRORS = (
    ("looplm.infra.configs", "ConfigFileError"),
    ("looplm.infra.configs", "PathError"),
    ("looplm.model.config", "ConfigError"),  # VocabularyTooLargeError too
    ("looplm.model.checkpoint", "CheckpointError"),
    ("looplm.infra.registry", "ModelNotFoundError"),
    ("looplm.infra.mlflow_server", "MlflowServerError"),
    ("looplm.pipelines.sources", "SourceError"),
    ("looplm.pipelines.curation.checks", "LowYieldError"),
    ("looplm.pipelines.register", "RegistrationError"),
    ("looplm.platform.executor", "LockHeldError"),
)


def is_user_error(err: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return True
    return False


class Parser(argparse.ArgumentParser):
    """argparse, with an argument error one line like every other user error (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="looplm", description="Looped language models, raw text to endpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--debug", action="store_true", help="show the traceback of any error")
        if name in WITH_CONFIG:
            command.add_argument("config", help="experiment YAML file")
            command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
        if name in ("run", "status"):
            command.add_argument("--quick", action="store_true", help="apply the experiment's `quick:` overrides first")
        if name == "run":
            command.add_argument("--dry-run", action="store_true", help="print run/skip per step and why; run nothing")
            command.add_argument(
                "--force", action="append", default=[], metavar="STEP", help="rerun STEP and everything downstream"
            )
            command.add_argument("--until", metavar="STEP", help="run only STEP and the steps it needs")
            continue
        if name == "status":
            continue
        if name == "upcycle":
            command.add_argument("src", help="Ouro HF checkpoint folder or models:/ URI to upcycle")
            command.add_argument("dst", help="new checkpoint folder (must not exist, or be empty)")
            command.add_argument("--factor", type=int, default=2, help="copies of each layer (default: 2)")
            command.add_argument(
                "--order",
                choices=("stacked", "interleaved"),
                default="stacked",
                help="stacked: layers [1..N, 1..N]; interleaved: [1, 1, 2, 2, ...] (default: stacked)",
            )
            continue
        if name == "register":
            command.add_argument("model", help="Ouro HF checkpoint folder (a training run's hf/, an upcycled folder)")
            command.add_argument("name", help="registered model name; each call adds a version")
            command.add_argument("--alias", help="alias to set on the new version, e.g. champion")
            command.add_argument("--description", help="the version's description")
            continue
        if name == "mlflow":
            command.add_argument("--port", type=int, help="port on 127.0.0.1 (default: 5000; 0: any free port)")
        if name == "serve":
            command.add_argument("model", help="Ouro HF checkpoint folder or models:/NAME/VERSION, models:/NAME@ALIAS")
            command.add_argument("--name", default="looplm", help="model name clients ask for (default: looplm)")
            command.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
            command.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
            command.add_argument(
                "--kv-cache", default="per_step", choices=("per_step", "last_step", "average"), help="KV strategy"
            )
            command.add_argument("--max-batch-size", type=int, default=32, help="running requests (default: 32)")
            command.add_argument("--api-key", action="append", help="bearer key clients must send (repeatable)")
            command.add_argument("--keep", action="store_true", help="return and leave the app on the cluster")
            continue
        command.add_argument("--output", help="output folder (default: under ./runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, function, _ = COMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), function)(args) or 0)
    except Exception as err:
        if args.debug or not is_user_error(err):
            raise
        print(f"looplm {args.command}: {err}", file=sys.stderr)  # the message names the problem and where
        return 2


if __name__ == "__main__":
    sys.exit(main())
