"""Register a trained LoopLM in the MLflow model registry, as a version the serving side loads by URI.

    looplm register runs/tiny/hf looplm-tiny --alias candidate         # the command: a run of its own
    version = register_model("runs/x/checkpoint", "looplm-tiny", run=step, metrics={"val_loss": 2.1})
    model = load_pretrained(resolve_model_dir("models:/looplm-tiny/1"))   # infra/registry.py downloads it
    generator = mlflow.pyfunc.load_model("models:/looplm-tiny/1")
    generator.predict(["Kalo Mira was born on"], params={"max_new_tokens": 16, "exit_threshold": 0.5})

The version's artifacts are the Ouro HF checkpoint folder itself (config.json, safetensors, tokenizer.json), as
the data of a pyfunc flavour whose loader is this module (`loader_module`): loading imports looplm and reads
safetensors, so no model class is ever pickled or unpickled. It needs looplm installed where it is loaded,
which the serving side has. The version links the training run (its run_id, plus a tag), carries the
evaluation metrics (logged on the MLflow LoggedModel and as version tags) and, optionally, an alias.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from looplm.infra.tracking import RunLogger
from looplm.model import QExit, load_pretrained
from looplm.model.checkpoint import CheckpointError, check_weights, load_config
from looplm.model.tokenizer import load_tokenizer

PYFUNC_DEFAULTS = {"max_new_tokens": 32, "num_steps": 0, "exit_threshold": 1.0, "temperature": 0.0, "seed": 0}


# ---------------------------------------------------------------- the pyfunc flavour (loaded by MLflow)


class TextGenerator:
    """What `mlflow.pyfunc.load_model` returns the inside of: prompts in, generated text out.

    params: max_new_tokens; num_steps (recurrent steps T, 0 = the model's own); exit_threshold (Q-exit q,
    1.0 runs every step); temperature (0 = greedy); seed.
    """

    def __init__(self, checkpoint: str | Path):
        self.model = load_pretrained(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        options = {**PYFUNC_DEFAULTS, **(params or {})}
        prompts = _prompts(model_input)
        config = self.model.config
        output = self.model.generate(
            [self.tokenizer.encode(p).ids or [config.bos_token_id] for p in prompts],
            max_new_tokens=int(options["max_new_tokens"]),
            num_steps=int(options["num_steps"]) or None,
            exit_policy=QExit(float(options["exit_threshold"])),
            temperature=float(options["temperature"]),
            seed=int(options["seed"]),
            stop_token_ids=[config.eos_token_id],
        )
        return [self.tokenizer.decode(tokens) for tokens in output.tokens]


def _prompts(model_input: Any) -> list[str]:
    """A str, a list of str, a {"prompt": ...} mapping or a DataFrame (a "prompt" column, or one column)."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, Mapping):
        value = model_input.get("prompt")
        return [value] if isinstance(value, str) else list(value or [])
    if hasattr(model_input, "columns"):  # pandas.DataFrame: a "prompt" column, or its only column
        columns = list(model_input.columns)
        if "prompt" not in columns and len(columns) != 1:
            raise ValueError(f"input DataFrame needs a 'prompt' column or a single column, has {columns}")
        return [str(v) for v in model_input["prompt" if "prompt" in columns else columns[0]]]
    if isinstance(model_input, Sequence) and all(isinstance(v, str) for v in model_input):
        return list(model_input)
    raise ValueError(f"cannot read prompts from {type(model_input).__name__}")


def _load_pyfunc(data_path: str) -> TextGenerator:
    """MLflow's entry point for `loader_module` flavours: data_path is the checkpoint folder."""
    return TextGenerator(data_path)


# ---------------------------------------------------------------- registration


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    dtypes = {int: "long", float: "double"}
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a list of prompts or a one-column DataFrame
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(k, dtypes[type(v)], v) for k, v in PYFUNC_DEFAULTS.items()]),
    )


def _requirements() -> list[str]:
    import mlflow
    import safetensors
    import tokenizers

    return [
        "looplm",  # the loader module; install the looplm checkout the model was trained with
        f"torch=={torch.__version__.split('+')[0]}",
        f"safetensors=={safetensors.__version__}",
        f"tokenizers=={tokenizers.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


def check_checkpoint(checkpoint: str | Path) -> Path:
    """A folder fit for registration: a loadable config.json, a tokenizer.json and weight files whose safetensors
    headers read (a file cut short by a failed copy is named here, not in whoever loads the version)."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    load_config(folder)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"checkpoint {folder} has no tokenizer.json; save it with save_pretrained(tokenizer=...)")
    check_weights(folder)
    return folder


def register_model(
    checkpoint: str | Path,
    name: str,
    *,
    run: RunLogger,
    metrics: Mapping[str, float] | None = None,
    training_run_id: str | None = None,
    alias: str | None = None,
    description: str | None = None,
) -> Any:
    """Log `checkpoint` as a pyfunc model from `run` and register it as a new version of `name`.

    Returns the MLflow ModelVersion. The server must be reachable: a registration is not queued.
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    folder = check_checkpoint(checkpoint)
    if not run.flush() or run.run_id is None:
        raise ConnectionError(f"cannot register {name!r}: tracking server {run.tracking_uri} is unreachable")
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    client = run.client
    # The client-only route (no global tracking URI or active run): create the LoggedModel, save the pyfunc
    # flavour locally, upload it, mark it ready and link it to the run as an output.
    experiment_id = client.get_run(run.run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run.run_id, model_type="looplm")
    with tempfile.TemporaryDirectory(prefix="looplm-register-") as staging:
        local = Path(staging) / "model"
        flavour_model = Model(
            artifact_path=logged.artifact_location,
            run_id=run.run_id,
            model_id=logged.model_id,
            model_uuid=logged.model_id,
        )
        # No input_example: MLflow would load the model and run it at save time; the signature says enough.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            mlflow.pyfunc.save_model(
                path=str(local),
                loader_module=__name__,
                data_path=str(folder),
                mlflow_model=flavour_model,
                signature=_signature(),
                pip_requirements=_requirements(),
                metadata={"looplm_config": json.loads((folder / "config.json").read_text())},
            )
        client.log_model_artifacts(logged.model_id, str(local))
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    if metrics:
        now = int(time.time() * 1000)
        entries = [Metric(k, v, now, 0, model_id=logged.model_id) for k, v in metrics.items()]
        client.log_batch(run.run_id, metrics=entries)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="A looped language model (Ouro LoopLM) from looplm")
    tags = {"looplm.registered_by_run": run.run_id, **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()}}
    if training_run_id:
        tags["looplm.training_run_id"] = training_run_id
    version = client.create_model_version(
        name,
        source=f"models:/{logged.model_id}",
        run_id=training_run_id or run.run_id,
        tags=tags,
        description=description,
        model_id=logged.model_id,
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    run.set_tags({"looplm.registered_model": f"models:/{name}/{version.version}"})
    return version


class RegistrationError(ValueError):
    """A registered model name or alias the registry would refuse; the message says which and why."""


def check_names(name: str, alias: str | None) -> None:
    """The model name and alias, by MLflow's own rules, before anything is logged: the registry refuses them only
    after the model's artifacts are uploaded, which would leave a logged model that no version points to."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    try:
        validation._validate_model_name(name)
        if alias is not None:
            validation._validate_model_alias_name(alias)
            validation._validate_model_alias_name_reserved(alias)
    except MlflowException as err:
        raise RegistrationError(f"{err.message} (model name {name!r}, alias {alias!r})") from None


def run_from_args(args) -> int:
    """`looplm register MODEL NAME [--alias A] [--description D]`: a checkpoint folder (a `looplm train` run's
    hf/, an upcycled folder) as a new version of NAME, in a run of its own, on MLFLOW_TRACKING_URI. The folder
    and the server are checked before any run exists."""
    from looplm.infra.mlflow_server import MlflowServerError, check_tracking_server
    from looplm.infra.tracking import pipeline_run

    folder = check_checkpoint(args.model)
    check_names(args.name, args.alias)
    tracking_uri = check_tracking_server()
    if tracking_uri is None:
        raise MlflowServerError("register needs a tracking server: set MLFLOW_TRACKING_URI (`looplm mlflow` starts it)")
    with pipeline_run(f"register-{args.name}", tracking_uri=tracking_uri, tags={"looplm.step": "register"}) as run:
        run.log_params({"model": str(folder.resolve()), "name": args.name})
        version = register_model(folder, args.name, run=run, alias=args.alias, description=args.description)
    print(f"registered models:/{args.name}/{version.version} from {folder} (MLflow run {run.run_id} at {tracking_uri})")
    return 0
