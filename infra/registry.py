"""Where a model lives: a checkpoint folder on disk, or a model in an MLflow registry, downloaded to a folder.

    resolve_model_dir("runs/demo/checkpoint")          -> that folder
    resolve_model_dir("models:/looplm-tiny/3")         -> a local copy of version 3's Ouro checkpoint folder
    resolve_model_dir("models:/looplm-tiny@champion")  -> the same for the version the alias points at

Registered looplm models carry the Ouro HF checkpoint folder (config.json, safetensors, tokenizer.json) as the
data of their pyfunc flavour (pipelines/register.py). A download is cached under LOOPLM_MODEL_CACHE (default
~/.cache/looplm/models), keyed by the registry's own id of the model, so a version is fetched once and a cached
copy is never mistaken for another server's model of the same name and version.

This is infra's job, not the model's: looplm.model reads folders only (`load_pretrained(resolve_model_dir(uri))`).
mlflow is imported inside the functions: a plain path needs nothing. The download is staged beside its cache
folder and renamed into place (looplm.model.atomic), so a crash never leaves half a model under the cache's name.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from looplm.model.atomic import staged_folder

MODEL_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
CACHE_ENV = "LOOPLM_MODEL_CACHE"
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))$")


class ModelNotFoundError(FileNotFoundError):
    """A model path or URI that names nothing loadable; the message names it."""


def is_model_uri(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(MODEL_URI_SCHEMES)


def resolve_model_dir(location: str | Path, *, tracking_uri: str | None = None) -> Path:
    """A local folder holding config.json for a path or an MLflow model URI (see the module docstring)."""
    if not is_model_uri(location):
        return Path(location)  # a folder: checking it is the loader's job (it names the missing file)
    return _download(str(location), tracking_uri)


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "looplm" / "models")


def _download(uri: str, tracking_uri: str | None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=tracking_uri)
    match = _REGISTERED.match(uri)
    try:
        if match:
            name = match["name"]
            version = (
                client.get_model_version(name, match["version"])
                if match["version"]
                else client.get_model_version_by_alias(name, match["alias"])
            )
            identity = f"{tracking_uri}|{version.source}|{version.run_id}"
            label = f"{name}-v{version.version}"
            # The version's own artifact location: a models:/ URI would be resolved by MLflow against the
            # process-wide registry URI (mlflow.get_registry_uri()), not against the server asked for here.
            download_uri = client.get_model_version_download_uri(name, version.version)
        elif uri.startswith("models:/"):
            raise ModelNotFoundError(f"model URI {uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
        else:
            identity, label, download_uri = f"{tracking_uri}|{uri}", "artifact", uri
    except MlflowException as err:
        raise ModelNotFoundError(f"model URI {uri!r} not found at tracking server {tracking_uri}: {err}") from None

    target = _cache_root() / f"{label}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    if not (target / ".complete").exists():
        try:
            with staged_folder(target, overwrite=True) as staging:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=download_uri,
                    dst_path=str(staging),
                    tracking_uri=tracking_uri,
                    registry_uri=tracking_uri,
                )
                (staging / ".complete").touch()
        except MlflowException as err:
            raise ModelNotFoundError(f"cannot download model {uri!r} from {tracking_uri}: {err}") from None
    return _checkpoint_folder(target, uri)


def _checkpoint_folder(root: Path, uri: str) -> Path:
    """The folder of a downloaded MLflow model that holds the checkpoint's config.json."""
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        import yaml

        flavour = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        data = flavour.get("data")
        if data and (root / data / "config.json").is_file():
            return root / data
    if (root / "config.json").is_file():
        return root
    found = sorted(root.rglob("config.json"))
    if not found:
        raise ModelNotFoundError(f"model {uri!r} holds no checkpoint folder (no config.json under {root})")
    return found[0].parent
