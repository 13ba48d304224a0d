"""Errors a person can read, for `looplm eval` and `looplm mlflow`: a user error (config, model, data, tracking
URI, port, folder) is one line on stderr that names the problem and where, exit code 2, no traceback, and no
MLflow run or server left behind. Each case goes through the real CLI entry point (`looplm.platform.cli.main`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from looplm.infra.mlflow_server import free_port
from looplm.model.tokenizer import train_byte_level_bpe
from looplm.platform.cli import main

REPO = Path(__file__).resolve().parents[2]
EVAL_CONFIG = str(REPO / "configs" / "eval-demo.yaml")


@pytest.fixture()
def store(tmp_path, monkeypatch) -> Path:
    """A sqlite tracking store nobody serves: eval needs no server, and whatever it creates is visible."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LOOPLM_TRACKING_SPILL_DIR", str(tmp_path / "spill"))
    return tmp_path


def _cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(case, arguments after `looplm`, a fragment the one line must hold)."""
    no_tokenizer = tmp / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    bad_tokenizer = tmp / "bad-tokenizer"
    bad_tokenizer.mkdir()
    (bad_tokenizer / "config.json").write_text("{}")
    (bad_tokenizer / "tokenizer.json").write_text('{"model": null}')
    good = tmp / "good"  # a checkpoint folder as far as the checks before work go: config.json and a tokenizer
    good.mkdir()
    (good / "config.json").write_text("{}")
    train_byte_level_bpe(["a small corpus", "of two documents"], 300).save(str(good / "tokenizer.json"))
    torn = tmp / "torn.jsonl"
    torn.write_text('{"text": "one"}\n\n{"text": "two"\n')
    not_text = tmp / "not-text.jsonl"
    not_text.write_text('{"text": "one"}\n["two"]\n')
    model = f"model={no_tokenizer}"
    return [
        ("config missing", ["eval", str(tmp / "nope.yaml")], "nope.yaml"),
        ("config is a folder", ["eval", str(tmp)], str(tmp)),
        ("unknown override", ["eval", EVAL_CONFIG, "no_such_field=1"], "no_such_field"),
        ("override of the wrong type", ["eval", EVAL_CONFIG, "batch_size=many"], "batch_size"),
        ("override out of range", ["eval", EVAL_CONFIG, "max_steps=0"], "max_steps"),
        ("malformed override", ["eval", EVAL_CONFIG, "max_steps"], "max_steps"),
        ("model folder missing", ["eval", EVAL_CONFIG, f"model={tmp / 'absent'}"], str(tmp / "absent")),
        ("model without tokenizer", ["eval", EVAL_CONFIG, model], "tokenizer.json"),
        ("tokenizer unreadable", ["eval", EVAL_CONFIG, f"model={bad_tokenizer}"], str(bad_tokenizer)),
        ("stage1 model missing", ["eval", EVAL_CONFIG, model, f"stage1_model={tmp / 's1'}"], str(tmp / "s1")),
        ("data missing", ["eval", EVAL_CONFIG, f"data.path={tmp / 'x.jsonl'}"], "x.jsonl"),
        ("data is a folder", ["eval", EVAL_CONFIG, f"data.path={tmp}"], "is not a file"),
        ("data line not JSON", ["eval", EVAL_CONFIG, f"data.path={torn}"], f"{torn}:3: not valid JSON"),
        ("data line not an object", ["eval", EVAL_CONFIG, f"data.path={not_text}"], f"{not_text}:2"),
        ("port out of range", ["mlflow", "--port", "70000"], "port"),
        ("output is a file", ["mlflow", "--port", "0", "--output", str(torn)], str(torn)),
    ]


def test_user_errors_are_one_line_and_exit_code_2(store, capsys):
    failures = []
    cases = _cases(store)
    for name, argv, fragment in cases:
        if argv[0] == "eval" and "data." in " ".join(argv):
            argv = [*argv, f"model={store / 'good'}"]  # the data checks come after the model's
        code = main(argv)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        prefix = f"looplm {argv[0]}: "
        if code != 2 or len(lines) != 1 or not lines[0].startswith(prefix) or fragment not in lines[0]:
            failures.append(f"{name}: exit {code}, stderr {err!r}")
        if argv[0] == "eval" and out:
            failures.append(f"{name}: wrote to stdout {out!r}")
    assert not failures, "\n".join(failures)
    assert len(cases) >= 16
    assert not (store / "mlflow.db").exists()  # no run, not even an experiment, for an attempt that never started


def test_a_dead_tracking_uri_is_one_line_for_eval(monkeypatch, tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["eval", EVAL_CONFIG]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("looplm eval: ") and f"MLFLOW_TRACKING_URI={uri} does not answer" in line


def test_debug_shows_the_traceback(store):
    import argparse

    from looplm.infra.configs import ConfigFileError
    from looplm.pipelines import evaluate

    args = argparse.Namespace(config=str(store / "nope.yaml"), overrides=[], output=None, debug=True)
    with pytest.raises(ConfigFileError, match="nope.yaml"):
        evaluate.run_from_args(args)


def test_the_command_line_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "LOOPLM_TRACKING_SPILL_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "looplm.platform.cli", "mlflow", "--port", "70000"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "looplm mlflow: MlflowServerConfig.port must be in [0, 65535], got 70000"
    ]


@pytest.mark.slow  # the session's server
def test_registered_model_that_does_not_exist_is_one_line(mlflow_server, monkeypatch, tmp_path, capsys):
    """Against a real registry: a URI that names no model version, and one that is not a model URI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("LOOPLM_TRACKING_SPILL_DIR", str(tmp_path))
    for uri in ("models:/no-such-model/1", "models:/only-a-name"):
        assert main(["eval", EVAL_CONFIG, f"model={uri}"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("looplm eval: ") and uri in line
