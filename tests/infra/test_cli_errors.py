"""Errors a person can read, for every command: a user error (a config, an override, an argument, a file, a model,
a tracking URI, a port) is one line on stderr that names the problem and where, exit code 2, no traceback, and no
output marked done: no `_SUCCESS`, no output folder, no MLflow run or registry version, no server left behind,
and no Ray started (every case is refused by the checks before work). Each case goes through the real CLI entry
point (`looplm.platform.cli.main`); one goes through a real `python -m looplm.platform.cli` process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from looplm.infra.mlflow_server import free_port
from looplm.model import LoopLM, LoopLMConfig
from looplm.model.checkpoint import save_pretrained
from looplm.model.tokenizer import train_byte_level_bpe
from looplm.platform.cli import main

REPO = Path(__file__).resolve().parents[2]
EVAL_CONFIG = str(REPO / "configs" / "eval-demo.yaml")
TRAIN_CONFIG = str(REPO / "configs" / "train-tiny-cpu.yaml")
DEAD = f"http://127.0.0.1:{free_port()}"  # a tracking URI nothing answers at


class Case(NamedTuple):
    name: str
    argv: list[str]  # after `looplm`
    fragment: str  # what the one line must hold (the problem, and where)
    env: dict[str, str | None] | None = None  # environment for this case (None: unset)
    not_done: Path | None = None  # an output that must not exist afterwards (or, for curate, hold no _SUCCESS)


@pytest.fixture()
def store(tmp_path, monkeypatch) -> Path:
    """A sqlite tracking store nobody serves: eval and register need no server, and whatever they create shows."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LOOPLM_TRACKING_SPILL_DIR", str(tmp_path / "spill"))
    return tmp_path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _checkpoints(tmp: Path) -> tuple[Path, Path]:
    """A real tiny checkpoint folder, and a copy whose model.safetensors is cut in half (a copy that died)."""
    good = tmp / "tiny"
    tokenizer = train_byte_level_bpe(["a small corpus", "of two documents"], 300)
    save_pretrained(LoopLM(LoopLMConfig.preset("tiny")), good, tokenizer=tokenizer)
    torn = tmp / "torn-model"
    torn.mkdir()
    for file in good.iterdir():
        data = file.read_bytes()
        (torn / file.name).write_bytes(data[: len(data) // 2] if file.suffix == ".safetensors" else data)
    return good, torn


def _eval_cases(tmp: Path) -> list[Case]:
    no_tokenizer = tmp / "no-tokenizer"
    _write(no_tokenizer / "config.json", "{}")
    bad_tokenizer = tmp / "bad-tokenizer"
    _write(bad_tokenizer / "config.json", "{}")
    _write(bad_tokenizer / "tokenizer.json", '{"model": null}')
    good = tmp / "good"  # a checkpoint folder as far as the checks before work go: config.json and a tokenizer
    _write(good / "config.json", "{}")
    train_byte_level_bpe(["a small corpus", "of two documents"], 300).save(str(good / "tokenizer.json"))
    torn = _write(tmp / "torn.jsonl", '{"text": "one"}\n\n{"text": "two"\n')
    not_text = _write(tmp / "not-text.jsonl", '{"text": "one"}\n["two"]\n')
    model, data_model = f"model={no_tokenizer}", f"model={good}"  # the data checks come after the model's
    return [
        Case("eval: config missing", ["eval", str(tmp / "nope.yaml")], "nope.yaml"),
        Case("eval: config is a folder", ["eval", str(tmp)], f"{tmp} is a folder"),
        Case("eval: unknown override", ["eval", EVAL_CONFIG, "no_such_field=1"], "no_such_field"),
        Case("eval: override of the wrong type", ["eval", EVAL_CONFIG, "batch_size=many"], "batch_size"),
        Case("eval: override out of range", ["eval", EVAL_CONFIG, "max_steps=0"], "max_steps"),
        Case("eval: malformed override", ["eval", EVAL_CONFIG, "max_steps"], "max_steps"),
        Case("eval: model folder missing", ["eval", EVAL_CONFIG, f"model={tmp / 'absent'}"], str(tmp / "absent")),
        Case("eval: model without tokenizer", ["eval", EVAL_CONFIG, model], "tokenizer.json"),
        Case("eval: tokenizer unreadable", ["eval", EVAL_CONFIG, f"model={bad_tokenizer}"], str(bad_tokenizer)),
        Case("eval: stage1 model missing", ["eval", EVAL_CONFIG, model, f"stage1_model={tmp / 's1'}"], "s1"),
        Case("eval: data missing", ["eval", EVAL_CONFIG, data_model, f"data.path={tmp / 'x.jsonl'}"], "x.jsonl"),
        Case("eval: data is a folder", ["eval", EVAL_CONFIG, data_model, f"data.path={tmp}"], "is not a file"),
        Case(
            "eval: data line not JSON",
            ["eval", EVAL_CONFIG, data_model, f"data.path={torn}"],
            f"{torn}:3: not valid JSON",
        ),
        Case(
            "eval: data line not an object", ["eval", EVAL_CONFIG, data_model, f"data.path={not_text}"], f"{not_text}:2"
        ),
    ]


def _curate_cases(tmp: Path) -> list[Case]:
    folder = tmp / "curate"
    out = folder / "out"
    config = _write(
        folder / "curate.yaml",
        f"sources: [{{name: mine, kind: jsonl, path: {folder / 'docs.jsonl'}}}]\nprogress: false\n",
    )
    _write(folder / "docs.jsonl", '{"id": 1, "text": "one document"}\n')
    empty = _write(folder / "empty.jsonl", "")
    blank = _write(folder / "blank.jsonl", "\n  \n\n")
    no_jsonl = folder / "only-text"
    _write(no_jsonl / "notes.txt", "not a jsonl file")
    empty_yaml = _write(folder / "empty.yaml", "# nothing set yet\n")
    args = ["curate", "--output", str(out)]

    def source(path: Path | str) -> list[str]:
        return [*args, str(config), f"sources.mine.path={path}"]

    return [
        Case("curate: config missing", [*args, str(folder / "nope.yaml")], "nope.yaml not found", not_done=out),
        Case("curate: config is a folder", [*args, str(folder)], f"{folder} is a folder", not_done=out),
        # Refused, not warned: an empty file would curate the embedded generated sources, not the user's data.
        Case("curate: empty YAML", [*args, str(empty_yaml)], f"{empty_yaml} is empty", not_done=out),
        Case("curate: unknown field", [*args, str(config), "minhash.no_such=1"], "no_such", not_done=out),
        Case("curate: wrong type", [*args, str(config), "batch_size=many"], "batch_size", not_done=out),
        Case("curate: unknown source kind", [*args, str(config), "sources.mine.kind=csv"], "'csv'", not_done=out),
        Case(
            "curate: unknown executor",
            [*args, str(config), "executor=dask"],
            "executor must be one of ray, local, got 'dask'",
            not_done=out,
        ),
        Case(
            "curate: a Ray address for the local executor",
            [*args, str(config), "executor=local", "ray_address=ray://head:10001"],
            "ray_address='ray://head:10001' with executor=local",
            not_done=out,
        ),
        Case(
            "curate: input file missing", source(folder / "absent.jsonl"), "absent.jsonl does not exist", not_done=out
        ),
        Case("curate: input folder holds no jsonl", source(no_jsonl), f"under {no_jsonl}", not_done=out),
        Case("curate: empty JSONL", source(empty), f"{empty} holds no documents", not_done=out),
        Case("curate: JSONL of blank lines", source(blank), f"{blank} holds no documents", not_done=out),
        Case(
            "curate: dead tracking URI",
            [*args, str(config)],
            f"MLFLOW_TRACKING_URI={DEAD} does not answer",
            env={"MLFLOW_TRACKING_URI": DEAD},
            not_done=out,
        ),
        Case(
            "curate: decontamination file missing",
            [*args, str(config), f"sources.mine.path={tmp / 'torn.jsonl'}", f"decontam.eval_files=[{tmp / 'q.jsonl'}]"],
            "q.jsonl does not exist",
            not_done=out,
        ),
    ]


def _train_cases(tmp: Path, torn_model: Path) -> list[Case]:
    out = tmp / "train-out"
    args = ["train", "--output", str(out), TRAIN_CONFIG]
    prefix = tmp / "data" / "web_train"
    _write(Path(f"{prefix}.idx"), "")  # an .idx without its .bin
    return [
        Case("train: config missing", ["train", str(tmp / "nope.yaml")], "nope.yaml not found", not_done=out),
        Case("train: empty YAML", ["train", str(_write(tmp / "empty.yaml", ""))], "empty.yaml is empty", not_done=out),
        Case("train: no data named", ["train", str(_write(tmp / "x.yaml", "{}"))], "data.manifest", not_done=out),
        # the override is valid (YAML 1.1 reads 1e-3 as a string): the error is the dataset's, not the rate's
        Case(
            "train: valid lr and a missing curated dataset",
            [*args, "optim.lr=1e-3", "data.generator=null", f"data.manifest={tmp / 'curated'}"],
            f"{tmp / 'curated' / 'mixture.json'} not found",
            not_done=out,
        ),
        Case(
            "train: dataset prefix missing",
            [*args, "data.generator=null", f"data.paths=[{tmp / 'data' / 'nowhere'}]"],
            f"{tmp / 'data' / 'nowhere'}.bin",
            not_done=out,
        ),
        Case(
            "train: dataset .bin missing",
            [*args, "data.generator=null", f"data.paths=[{prefix}]"],
            f"{prefix}.bin",
            not_done=out,
        ),
        Case(
            "train: lr not a number", [*args, "optim.lr=fast"], "optim.lr: expected a number, got 'fast'", not_done=out
        ),
        Case(
            "train: batch sizes do not divide",
            [*args, "data.global_batch_size=12"],
            "data.global_batch_size (12) is not a multiple",
            not_done=out,
        ),
        Case(
            "train: tensor parallel does not fit",
            [*args, "parallel.tensor_parallel=3"],
            "tensor_parallel (3) does not divide",
            not_done=out,
        ),
        Case(
            "train: pipeline parallel does not fit",
            [*args, "parallel.pipeline_parallel=3"],
            "pipeline_parallel (3) does not divide",
            not_done=out,
        ),
        Case(
            "train: init_from_hf missing",
            [*args, f"train.init_from_hf={tmp / 'stage1'}"],
            f"train.init_from_hf: {tmp / 'stage1'}",
            not_done=out,
        ),
        Case(
            "train: init_from_hf of another shape",
            [*args, f"train.init_from_hf={tmp / 'tiny'}", "model.overrides.num_hidden_layers=4"],
            "num_hidden_layers 2 != 4",
            not_done=out,
        ),
        Case(
            "train: init_from_hf with a truncated safetensors file",
            [*args, f"train.init_from_hf={torn_model}"],
            str(torn_model / "model.safetensors"),
            not_done=out,
        ),
    ]


def _register_cases(tmp: Path, torn_model: Path) -> list[Case]:
    not_model = tmp / "not-a-model"
    _write(not_model / "notes.txt", "hello")
    return [
        Case("register: model folder missing", ["register", str(tmp / "absent"), "m"], str(tmp / "absent")),
        Case("register: not a model", ["register", str(not_model), "m"], str(not_model / "config.json")),
        Case(
            "register: truncated safetensors", ["register", str(torn_model), "m"], str(torn_model / "model.safetensors")
        ),
        Case("register: name with a slash", ["register", str(tmp / "tiny"), "team/model"], "'team/model'"),
        Case("register: reserved alias", ["register", str(tmp / "tiny"), "m", "--alias", "latest"], "'latest'"),
        Case(
            "register: dead tracking URI",
            ["register", str(tmp / "tiny"), "m"],
            f"MLFLOW_TRACKING_URI={DEAD} does not answer",
            env={"MLFLOW_TRACKING_URI": DEAD},
        ),
        Case(
            "register: no tracking URI",
            ["register", str(tmp / "tiny"), "m"],
            "MLFLOW_TRACKING_URI",
            env={"MLFLOW_TRACKING_URI": None},
        ),
    ]


def _upcycle_cases(tmp: Path, torn_model: Path) -> list[Case]:
    dst = tmp / "upcycled"
    full = tmp / "full"
    _write(full / "keep.txt", "someone's files")
    return [
        Case("upcycle: source missing", ["upcycle", str(tmp / "absent"), str(dst)], str(tmp / "absent"), not_done=dst),
        Case(
            "upcycle: source not a model", ["upcycle", str(tmp / "not-a-model"), str(dst)], "config.json", not_done=dst
        ),
        Case(
            "upcycle: truncated safetensors",
            ["upcycle", str(torn_model), str(dst)],
            str(torn_model / "model.safetensors"),
            not_done=dst,
        ),
        Case(
            "upcycle: registered model on a dead tracking URI",
            ["upcycle", "models:/looplm-tiny/1", str(dst)],
            f"MLFLOW_TRACKING_URI={DEAD} does not answer",
            env={"MLFLOW_TRACKING_URI": DEAD},
            not_done=dst,
        ),
        Case("upcycle: factor 0", ["upcycle", str(tmp / "tiny"), str(dst), "--factor", "0"], "factor", not_done=dst),
        Case(
            "upcycle: unknown order",
            ["upcycle", str(tmp / "tiny"), str(dst), "--order", "zigzag"],
            "'zigzag'",
            not_done=dst,
        ),
        Case(
            "upcycle: destination not empty",
            ["upcycle", str(tmp / "tiny"), str(full)],
            f"{full} exists and is not empty",
        ),
    ]


def _run_cases(tmp: Path) -> list[Case]:
    folder = tmp / "experiments"
    root = folder / "root"
    curate = "{kind: curate, config: {sources: [{name: bios, kind: bios, count: 10}]}}"
    good = _write(
        folder / "exp.yaml",
        f"root: {root}\nsteps:\n  curate: {curate}\n"
        "  pretrain: {kind: pretrain, inputs: {data: curate}, config_file: ../train.yaml}\n",
    )
    _write(tmp / "train.yaml", Path(TRAIN_CONFIG).read_text())

    def experiment(name: str, steps: str) -> str:
        return str(_write(folder / name, f"root: {root}\nsteps:\n{steps}"))

    source = {"name": "m", "kind": "jsonl", "path": str(tmp / "in.jsonl")}
    pretrain = {
        "kind": "pretrain",
        "config_file": "../train.yaml",
        "config": {"train": {"init_from_hf": str(tmp / "s1")}},
    }
    cycle = "  a: {kind: upcycle, inputs: {model: b}}\n  b: {kind: upcycle, inputs: {model: a}}\n"
    return [
        Case("run: experiment missing", ["run", str(folder / "nope.yaml")], "nope.yaml not found", not_done=root),
        Case("run: empty experiment", ["run", str(_write(folder / "empty.yaml", ""))], "empty.yaml is empty"),
        Case(
            "run: unknown step kind",
            ["run", experiment("kind.yaml", "  t: {kind: teach}\n")],
            "steps.t.kind: 'teach' is not one of",
            not_done=root,
        ),
        Case(
            "run: unknown input role",
            [
                "run",
                experiment("role.yaml", f"  curate: {curate}\n  e: {{kind: evaluate, inputs: {{teacher: curate}}}}\n"),
            ],
            "steps.e.inputs.teacher",
            not_done=root,
        ),
        Case(
            "run: a cycle", ["run", experiment("cycle.yaml", cycle)], "steps.a.inputs.model: 'b' is not an earlier step"
        ),
        Case(
            "run: config_file missing",
            ["run", experiment("file.yaml", "  p: {kind: pretrain, config_file: gone.yaml}\n")],
            "gone.yaml not found",
            not_done=root,
        ),
        Case(
            "run: a curate step's input file missing",
            [
                "run",
                experiment("input.yaml", f"  c: {json.dumps({'kind': 'curate', 'config': {'sources': [source]}})}\n"),
            ],
            f"steps.c.config: source 'm': {tmp / 'in.jsonl'} does not exist",
            not_done=root,
        ),
        Case(
            "run: a pretrain step's starting checkpoint missing",
            [
                "run",
                experiment("init.yaml", f"  p: {json.dumps(pretrain)}\n"),
            ],
            f"steps.p.config: train.init_from_hf: {tmp / 's1'}",
            not_done=root,
        ),
        Case(
            "run: bad override of a step field",
            ["run", str(good), "steps.pretrain.config.optim.lr=fast"],
            "steps.pretrain.config.optim.lr",
            not_done=root,
        ),
        Case(
            "run: override names no step", ["run", str(good), "steps.train.config.x=1"], "name no step", not_done=root
        ),
        Case(
            "run: dead tracking URI",
            ["run", str(good)],
            f"MLFLOW_TRACKING_URI={DEAD} does not answer",
            env={"MLFLOW_TRACKING_URI": DEAD},
            not_done=root,
        ),
        Case("run: --until names no step", ["run", str(good), "--until", "train"], "'train'", not_done=root),
        Case("run: --force names no step", ["run", str(good), "--force", "train"], "train", not_done=root),
        Case("status: override names no step", ["status", str(good), "steps.x.config.y=1"], "name no step"),
    ]


def _mlflow_cases(tmp: Path, taken_port: int) -> list[Case]:
    return [
        Case("mlflow: port out of range", ["mlflow", "--port", "70000"], "port"),
        Case("mlflow: port not a number", ["mlflow", "--port", "five"], "'five'"),
        Case("mlflow: output is a file", ["mlflow", "--port", "0", "--output", str(tmp / "torn.jsonl")], "torn.jsonl"),
        Case("mlflow: port taken", ["mlflow", "--port", str(taken_port)], f"port {taken_port} on 127.0.0.1 is taken"),
    ]


def _done(path: Path) -> bool:
    """Whether an output is there: a curate folder counts only with its _SUCCESS (its report may be written)."""
    return (path / "_SUCCESS").exists() if path.name == "out" else path.exists()


def test_user_errors_are_one_line_and_exit_code_2(store, monkeypatch, capsys):
    _, torn_model = _checkpoints(store)
    with socket.socket() as taken:  # a program that is not MLflow holds the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [
            *_eval_cases(store),
            *_curate_cases(store),
            *_train_cases(store, torn_model),
            *_register_cases(store, torn_model),
            *_upcycle_cases(store, torn_model),
            *_run_cases(store),
            *_mlflow_cases(store, taken.getsockname()[1]),
        ]
        failures = []
        for case in cases:
            with monkeypatch.context() as env:
                for key, value in (case.env or {}).items():
                    env.delenv(key, raising=False) if value is None else env.setenv(key, value)
                try:
                    code = main(case.argv)
                except SystemExit as exit_:  # argparse
                    code = exit_.code
                except Exception as err:  # what a person would see as a traceback; the other cases still run
                    code = f"{type(err).__name__} raised: {str(err)[:300]}"
            out, err = capsys.readouterr()
            lines = err.strip().splitlines()
            prefix = f"looplm {case.argv[0]}: "
            if code != 2 or len(lines) != 1 or not lines[0].startswith(prefix) or case.fragment not in lines[0]:
                failures.append(f"{case.name}: exit {code}, stderr {err[-2000:]!r}")
            if out:
                failures.append(f"{case.name}: wrote to stdout {out!r}")
            if case.not_done is not None and _done(case.not_done):
                failures.append(f"{case.name}: left {case.not_done} behind")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    commands = [case.argv[0] for case in cases]
    for command in ("curate", "train", "eval", "register", "upcycle", "mlflow", "run"):
        assert commands.count(command) >= 3, command
    assert len(cases) >= 30
    # no run, not even an experiment, for an attempt that never started; no registered model version either
    assert not (store / "mlflow.db").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()  # every case was refused before Ray


def test_what_train_checks_before_ray_accepts_good_inputs(tmp_path):
    """The other side of the train cases above: a starting checkpoint of the model's shapes, dataset prefixes
    whose .bin and .idx exist, and a valid override pass the checks (they would then start Ray)."""
    from looplm.infra.configs import load_config
    from looplm.pipelines.pretrain_inputs import check_inputs
    from looplm.pipelines.training.config import PretrainConfig

    good, _ = _checkpoints(tmp_path)
    for suffix in (".bin", ".idx"):
        _write(tmp_path / f"web{suffix}", "")
    overrides = [
        "optim.lr=1e-3",
        f"train.init_from_hf={good}",
        "data.generator=null",
        f"data.paths=[{tmp_path / 'web'}]",
    ]
    config = load_config(PretrainConfig, TRAIN_CONFIG, overrides)
    assert config.optim.lr == pytest.approx(1e-3)
    check_inputs(config)


def test_a_dead_tracking_uri_is_one_line_for_eval(monkeypatch, tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["eval", EVAL_CONFIG]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("looplm eval: ") and f"MLFLOW_TRACKING_URI={uri} does not answer" in line


def test_debug_shows_the_traceback(store):
    from looplm.infra.configs import ConfigFileError

    with pytest.raises(ConfigFileError, match="nope.yaml"):
        main(["eval", "--debug", str(store / "nope.yaml")])
    with pytest.raises(ConfigFileError, match="nope.yaml"):
        main(["curate", "--debug", str(store / "nope.yaml")])


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


@pytest.mark.slow  # the one case that starts Ray: that every document is removed is known only after the filters
def test_curate_that_removes_every_document_exits_2_and_is_not_marked_done(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    docs = _write(tmp_path / "short.jsonl", "".join(f'{{"id": {i}, "text": "too short {i}"}}\n' for i in range(3)))
    config = _write(
        tmp_path / "curate.yaml",
        f"sources: [{{name: notes, kind: jsonl, path: {docs}, skip: [langid]}}]\nprogress: false\nnum_cpus: 1\n",
    )
    out = tmp_path / "out"
    assert main(["curate", str(config), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if "notes" in line and "kept none" in line]
    assert len(errors) == 1 and errors[0].startswith("looplm curate: source 'notes' kept none of 3 documents read")
    assert "mostly removed by gopher" in errors[0] and "Nothing is marked done" in errors[0]  # why, and not done
    assert not (out / "_SUCCESS").exists() and not (out / "megatron").exists()
    assert (out / "report" / "report.md").exists()  # the report says what removed them
