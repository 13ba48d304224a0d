"""A pipeline-style run: evaluate, register, and load the registered model back by models:/ URI."""

import dataclasses

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from looplm.infra.registry import ModelNotFoundError, resolve_model_dir
from looplm.infra.tracking import pipeline_run, step_run
from looplm.model import QExit, load_pretrained
from looplm.model.checkpoint import CheckpointError
from looplm.model.tokenizer import load_tokenizer
from looplm.pipelines import evaluate
from looplm.pipelines.register import register_model


@pytest.mark.slow
def test_pipeline_run_registers_a_version_that_loads_back_identically(
    trained_tiny,
    mlflow_server,
    monkeypatch,
    tmp_path,
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    config = evaluate.EvalConfig(
        model=str(trained_tiny.stage2),
        max_steps=5,
        data=evaluate.EvalData(people=30, seq_len=64, max_sequences=6),
        experiment="test-register",
    )
    with pipeline_run("pipeline", config={"eval": dataclasses.asdict(config)}, experiment="test-register") as run:
        with step_run(run, "train") as train_step:
            train_step.log_metrics({"loss": 2.5}, step=10)
        with step_run(run, "evaluate", config=config) as eval_step:
            table = evaluate.run(config, eval_step)
        summary = next(r for r in table if r["kind"] == "step" and r["step"] == 4)
        with step_run(run, "register") as register_step:
            version = register_model(
                trained_tiny.stage2,
                "looplm-test-tiny",
                run=register_step,
                metrics={"val_loss": summary["loss"], "val_acc": summary["acc"]},
                training_run_id=train_step.run_id,
                alias="candidate",
            )

    client = MlflowClient(mlflow_server.url)
    children = client.search_runs(
        [client.get_run(run.run_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'"
    )
    assert sorted(c.data.tags["looplm.step"] for c in children) == ["evaluate", "register", "train"]
    assert client.get_run(run.run_id).data.params["eval.max_steps"] == "5"
    assert len(client.get_metric_history(eval_step.run_id, "val_loss_by_step")) == 5
    assert {a.path for a in client.list_artifacts(eval_step.run_id, "plots")} == {
        "plots/loss_by_step.png",
        "plots/compute_quality.png",
        "plots/exit_histogram.png",
    }

    # The version: training run linked, evaluation metrics attached, artifacts = the Ouro checkpoint folder.
    registered = client.get_model_version("looplm-test-tiny", version.version)
    assert registered.run_id == train_step.run_id
    assert registered.tags["looplm.training_run_id"] == train_step.run_id
    assert float(registered.tags["metric.val_loss"]) == pytest.approx(summary["loss"], rel=1e-5)
    assert registered.source.startswith("models:/m-")
    logged = client.get_logged_model(registered.model_id or registered.source.removeprefix("models:/"))
    assert {m.key for m in logged.metrics} == {"val_loss", "val_acc"}
    folder = resolve_model_dir(f"models:/looplm-test-tiny/{version.version}")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    original = load_pretrained(trained_tiny.stage2)
    ids = trained_tiny.valid[:3, :-1]
    for uri in (f"models:/looplm-test-tiny/{version.version}", "models:/looplm-test-tiny@candidate"):
        loaded = load_pretrained(resolve_model_dir(uri))  # infra downloads, the model reads the folder
        for a, b in zip(original(ids).logits, loaded(ids).logits, strict=True):
            assert torch.equal(a, b)

    # Evaluating the registered model by URI gives the checkpoint's own figures.
    by_uri = evaluate.run(dataclasses.replace(config, model="models:/looplm-test-tiny@candidate"))
    assert [r["loss"] for r in by_uri if r["kind"] == "step"] == [r["loss"] for r in table if r["kind"] == "step"]

    # The pyfunc flavour generates text, loaded without unpickling a model class.
    generator = mlflow.pyfunc.load_model(f"models:/looplm-test-tiny/{version.version}")
    tokenizer = load_tokenizer(trained_tiny.stage2)
    prompt = "Garloan Fibriis Veldenbri was born on"
    texts = generator.predict([prompt], params={"max_new_tokens": 8, "exit_threshold": 0.5})
    direct = original.generate(
        [tokenizer.encode(prompt).ids],
        max_new_tokens=8,
        exit_policy=QExit(0.5),
        stop_token_ids=[original.config.eos_token_id],
    )
    assert texts == [tokenizer.decode(direct.tokens[0])]

    # Resolving a URI asks the server it is given, whatever the process's global MLflow settings say
    # (mlflow.set_tracking_uri elsewhere in a process sets both of these).
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("LOOPLM_MODEL_CACHE", str(tmp_path / "fresh-cache"))
    folder = resolve_model_dir("models:/looplm-test-tiny@candidate", tracking_uri=mlflow_server.url)
    assert (folder / "config.json").is_file() and str(folder).startswith(str(tmp_path / "fresh-cache"))


@pytest.mark.slow  # needs the session's server (and model)
def test_unknown_model_uri_is_named(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    with pytest.raises(ModelNotFoundError, match="models:/no-such-model/3"):
        resolve_model_dir("models:/no-such-model/3")
    with pytest.raises(CheckpointError, match="registry URI and looplm.model reads folders"):
        load_pretrained("models:/no-such-model/3")
    with pytest.raises(ModelNotFoundError, match="models:/no-such-model@best"):
        resolve_model_dir("models:/no-such-model@best")
    with pytest.raises(ModelNotFoundError, match="not models:/NAME/VERSION"):
        resolve_model_dir("models:/a/b/c")


@pytest.mark.slow  # needs the session's server (and model)
def test_registering_a_folder_without_tokenizer_is_refused(trained_tiny, mlflow_server, tmp_path):
    model = load_pretrained(trained_tiny.stage2)
    model.save_pretrained(tmp_path / "bare")
    with pipeline_run("bad-register", experiment="test-register", tracking_uri=mlflow_server.url) as run:
        with pytest.raises(CheckpointError, match="tokenizer.json"):
            register_model(tmp_path / "bare", "looplm-test-bare", run=run)
        with pytest.raises(CheckpointError, match="does not exist"):
            register_model(tmp_path / "missing", "looplm-test-bare", run=run)


@pytest.mark.slow  # needs the session's server
def test_looplm_register_adds_a_version_with_its_alias(mlflow_server, monkeypatch, tmp_path, capsys):
    from looplm.model import LoopLM, LoopLMConfig
    from looplm.model.checkpoint import save_pretrained
    from looplm.model.tokenizer import train_byte_level_bpe
    from looplm.platform.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("LOOPLM_MODEL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    model = LoopLM(LoopLMConfig.preset("tiny"))
    save_pretrained(model, folder, tokenizer=train_byte_level_bpe(["a small corpus", "of two documents"], 300))
    assert main(["register", str(folder), "looplm-test-cli", "--alias", "cli"]) == 0
    version = MlflowClient(mlflow_server.url).get_model_version_by_alias("looplm-test-cli", "cli")
    assert f"registered models:/looplm-test-cli/{version.version} from {folder}" in capsys.readouterr().out
    loaded = load_pretrained(resolve_model_dir("models:/looplm-test-cli@cli"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
