"""The studies (docs/studies.md) as experiments: the quick variant of every study runs through the executor on a
real local Ray with a real MLflow server. Their MLflow runs, metrics and plots are checked; multi-hop exact match
against the reasoning evaluation's independent computation, the loop-robust held-out loss past T against a
cross-entropy computed from the saved model, the KV figures against a cacheless greedy decode, and the gap's
interval against scipy's Welch test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from looplm.infra.configs import ConfigFileError
from looplm.pipelines.study_report import welch_interval
from looplm.platform.executor import Storage, plan
from looplm.platform.experiment import load_experiment, run_experiment

REPO = Path(__file__).resolve().parents[2]
MULTIHOP = REPO / "configs" / "studies" / "multihop.yaml"
LOOP_ROBUST = REPO / "configs" / "studies" / "loop-robust.yaml"
KV_SHARING = REPO / "configs" / "studies" / "kv-sharing.yaml"
MODELS = ("looped", "iso_param", "iso_flop")


def test_welch_interval_matches_scipy():
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(0)
    for n_a, n_b in ((3, 3), (5, 4), (8, 2)):
        a, b = rng.normal(0.5, 0.05, n_a), rng.normal(0.42, 0.08, n_b)
        ours = welch_interval(a.tolist(), b.tolist(), confidence=0.9)
        theirs = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.9)
        assert ours["gap"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
        assert (ours["low"], ours["high"]) == pytest.approx((theirs.low, theirs.high), abs=1e-10)
    single = welch_interval([0.5], [0.4, 0.45])
    assert single["gap"] == pytest.approx(0.075) and np.isnan(single["low"])  # one seed: no spread to estimate


def test_a_field_the_model_or_trainer_does_not_know_is_an_error_naming_it():
    with pytest.raises(ConfigFileError, match=r"models\.looped\.training: unknown field\(s\) random_stepz"):
        load_experiment(MULTIHOP, ["steps.train.config.models.looped.training.random_stepz=[2,6]"], quick=True)
    with pytest.raises(ConfigFileError, match=r"models\.iso_flop\.model: unknown field\(s\) num_layerz"):
        load_experiment(MULTIHOP, ["steps.train.config.models.iso_flop.model.num_layerz=8"], quick=True)
    with pytest.raises(ConfigFileError, match=r"seed is set by the study"):
        load_experiment(MULTIHOP, ["steps.train.config.training.seed=3"], quick=True)
    with pytest.raises(ConfigFileError, match=r"--quick needs a `quick:` list"):
        load_experiment(REPO / "configs" / "demo.yaml", quick=True)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_file_loads_full_and_quick_with_every_model_checked(path):
    """Loading builds every model's LoopLMConfig and TrainSettings, so a field that the model or trainer no longer
    knows fails here, not an hour into a run."""
    for quick in (False, True):
        experiment = load_experiment(path, quick=quick)
        names = [s.name for s in experiment.steps]
        assert names[-1] == "report" and len(names) > 2 and all(n.startswith("train.") for n in names[:-1])


def test_the_matrix_is_one_cached_step_per_model_and_seed(tmp_path):
    experiment = load_experiment(MULTIHOP, [f"root={tmp_path}"], quick=True)
    names = [s.name for s in experiment.steps]
    assert names == [f"train.{m}.s{s}" for m in MODELS for s in (0, 1)] + ["report"]
    assert sorted(experiment.step("report").inputs) == sorted(f"runs/train.{m}.s{s}" for m in MODELS for s in (0, 1))
    # A third seed adds three runs; the first two seeds' steps keep their hashes (their folders are reused).
    more = load_experiment(MULTIHOP, [f"root={tmp_path}", "steps.train.config.seeds=[0,1,2]"], quick=True)
    before = {p.step.name: p.hash for p in plan(experiment.steps, Storage.at(tmp_path))}
    after = {p.step.name: p.hash for p in plan(more.steps, Storage.at(tmp_path))}
    assert {n for n in after if n not in before} == {f"train.{m}.s2" for m in MODELS}
    assert all(after[n] == before[n] for n in before if n != "report")
    assert after["report"] != before["report"]


@pytest.fixture(scope="module")
def local_ray():
    from looplm.infra.ray_cluster import ray_session

    with ray_session(num_cpus=2):
        yield


def run_quick_study(path: Path, name: str, root: Path, tracking_uri: str):
    """Run a study's --quick variant through the executor; its parent run id, nested runs by step, and result."""
    from mlflow.tracking import MlflowClient

    experiment = load_experiment(path, [f"root={root}", f"name={name}"], quick=True)
    result = run_experiment(experiment, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("looplm").experiment_id], f"attributes.run_name LIKE '{name}%'"
    )
    assert [r.info.run_id for r in runs if r.info.run_name == name] == [result.run_id]
    nested = {r.data.tags["looplm.step"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.run_id}
    assert set(nested) == {s.name for s in experiment.steps}
    assert all(run.info.status == "FINISHED" for run in nested.values())
    return experiment, result, client, nested


def report_plots(client, report, folder: Path) -> set[str]:
    plots = {Path(a.path).name for a in client.list_artifacts(report.info.run_id, "plots")}
    for plot in plots:
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return plots


@pytest.mark.slow
def test_quick_multihop_study_through_the_executor_lands_in_mlflow(tmp_path, mlflow_server, local_ray):
    experiment, result, client, nested = run_quick_study(MULTIHOP, "studies-test", tmp_path, mlflow_server.url)
    assert set(nested) == {f"train.{m}.s{s}" for m in MODELS for s in (0, 1)} | {"report"}
    for name, run in nested.items():
        if name == "report":
            continue
        model, seed = name.split(".")[1], name.split(".")[2]
        assert run.data.tags["looplm.study.model"] == model and run.data.tags["looplm.study.seed"] == seed[1:]
        record = result.records[name]
        for t in range(1, 7):  # every model at 1..T+2 passes
            assert run.data.metrics[f"exact_match/t{t:02d}"] == pytest.approx(record.exact_match[t - 1])
            assert run.data.metrics[f"val_loss/t{t:02d}"] == pytest.approx(record.val_loss[t - 1])
        assert len(client.get_metric_history(run.info.run_id, "exact_match_by_pass")) == 6
        assert len(client.get_metric_history(run.info.run_id, "loss")) >= 3  # the training curve
    looped = nested["train.looped.s0"].data.metrics
    assert {"exit_qexit_stage2/avg_steps", "exit_qexit_stage1/exact_match", "exit_hdiff/avg_steps"} <= set(looped)
    assert {"kv_last_step/nll_gap", "kv_average/agreement", "kv_per_step/nll"} <= set(looped)
    assert looped["kv_per_step/agreement"] == 1.0

    report = nested["report"]
    folder = Path(result.folders["report"])
    assert report_plots(client, report, folder) == {
        "exact_match_by_pass.png", "val_loss_by_pass.png", "compute_quality.png", "early_exit_looped.png",
        "kv_sharing.png",
    }  # fmt: skip
    table = json.loads((folder / "study.json").read_text())
    for model in MODELS:
        scores = [result.records[f"train.{model}.s{s}"].exact_match[0] for s in (0, 1)]
        assert table["models"][model]["exact_match"]["mean"][0] == pytest.approx(sum(scores) / 2)
    gap = result.records["report"].gaps["looped-iso_param"]
    looped_at_t = [result.records[f"train.looped.s{s}"].exact_match[3] for s in (0, 1)]
    iso_at_t = [result.records[f"train.iso_param.s{s}"].exact_match[0] for s in (0, 1)]
    assert gap["gap"] == pytest.approx(sum(looped_at_t) / 2 - sum(iso_at_t) / 2)
    assert report.data.metrics["gap/looped-iso_param/gap"] == pytest.approx(gap["gap"])

    # The recorded exact match equals the reasoning evaluation's, computed from the saved model and its tokenizer.
    from looplm.model import load_pretrained
    from looplm.model.tokenizer import load_tokenizer
    from looplm.pipelines.reasoning_eval import exact_match_by_step
    from looplm.pipelines.studies import build_data

    step = experiment.step("train.looped.s1")
    saved = Path(result.folders["train.looped.s1"]) / "hf"
    items = build_data(step.config.data, step.config.eval).test
    expected = exact_match_by_step(load_pretrained(saved), load_tokenizer(saved), items, max_steps=6)
    assert result.records["train.looped.s1"].exact_match == pytest.approx(expected)


@pytest.mark.slow
def test_quick_loop_robust_study_measures_every_option_past_the_trained_t(tmp_path, mlflow_server, local_ray):
    experiment, result, client, nested = run_quick_study(LOOP_ROBUST, "robust-test", tmp_path, mlflow_server.url)
    arms = ("default", "random_steps", "contraction", "reinject", "kv_consistency")
    assert set(nested) == {f"train.{a}.s{s}" for a in arms for s in (0, 1)} | {"report"}

    def history(arm: str, metric: str) -> list[float]:
        return [m.value for m in client.get_metric_history(nested[f"train.{arm}.s0"].info.run_id, metric)]

    # Each option reached the trainer: T drawn per batch from [2, 6], the penalties' terms logged, the embedding
    # re-injected in the saved model; default training runs T = 4 and logs neither penalty.
    assert set(history("default", "recurrent_steps")) == {4.0}
    drawn = set(history("random_steps", "recurrent_steps"))
    assert drawn <= {2.0, 3.0, 4.0, 5.0, 6.0} and len(drawn) > 1
    assert history("contraction", "contraction") and not history("default", "contraction")
    assert history("kv_consistency", "kv_consistency") and not history("default", "kv_consistency")
    saved = {a: json.loads((Path(result.folders[f"train.{a}.s0"]) / "hf" / "config.json").read_text()) for a in arms}
    assert saved["reinject"]["reinject_embedding"] is True
    assert not any(saved[a].get("reinject_embedding") for a in arms if a != "reinject")

    for name, run in nested.items():  # T - 2 .. T + 4 passes: 1..8
        if name != "report":
            record = result.records[name]
            assert len(record.exact_match) == len(record.val_loss) == 8
            assert run.data.metrics["val_loss/t08"] == pytest.approx(record.val_loss[7])

    # The held-out loss at every pass, past the trained T too, equals a cross-entropy computed here from the saved
    # model's logits at 8 passes (the quick models are too small to answer questions: their exact match is 0).
    import torch
    import torch.nn.functional as F

    from looplm.model import load_pretrained
    from looplm.pipelines.studies import build_data

    step = experiment.step("train.random_steps.s1")
    rows = build_data(step.config.data, step.config.eval).valid_rows
    model = load_pretrained(Path(result.folders["train.random_steps.s1"]) / "hf")
    with torch.no_grad():
        logits = model(rows[:, :-1], num_steps=8).logits
    expected = [float(F.cross_entropy(step_logits.flatten(0, 1), rows[:, 1:].flatten())) for step_logits in logits]
    assert result.records["train.random_steps.s1"].val_loss == pytest.approx(expected, rel=1e-4)
    assert all(a != b for a, b in zip(expected[:-1], expected[1:], strict=True))  # each pass changes the loss

    report = nested["report"]
    assert report_plots(client, report, Path(result.folders["report"])) == {
        "exact_match_by_pass.png", "val_loss_by_pass.png", "compute_quality.png"
    }  # fmt: skip
    for arm in arms[1:]:
        gap = result.records["report"].gaps[f"{arm}-default"]
        ours = [result.records[f"train.{arm}.s{s}"].exact_match[3] for s in (0, 1)]
        base = [result.records[f"train.default.s{s}"].exact_match[3] for s in (0, 1)]
        assert gap["gap"] == pytest.approx(sum(ours) / 2 - sum(base) / 2)
        assert report.data.metrics[f"gap/{arm}-default/gap"] == pytest.approx(gap["gap"])


@pytest.mark.slow
def test_quick_kv_sharing_study_records_each_cache_against_a_cacheless_decode(tmp_path, mlflow_server, local_ray):
    import torch

    experiment, result, client, nested = run_quick_study(KV_SHARING, "kv-test", tmp_path, mlflow_server.url)
    arms = ("default", "kv_consistency", "shared_kv")
    assert set(nested) == {f"train.{a}.s{s}" for a in arms for s in (0, 1)} | {"report"}
    run_metrics = {name: run.data.metrics for name, run in nested.items()}
    assert "shared_kv" in run_metrics["train.shared_kv.s0"] and "shared_kv" not in run_metrics["train.default.s0"]
    assert "kv_consistency" in run_metrics["train.kv_consistency.s0"]
    for arm in arms:
        for seed in (0, 1):
            metrics, kv = run_metrics[f"train.{arm}.s{seed}"], result.records[f"train.{arm}.s{seed}"].kv
            assert set(kv) == {"per_step", "last_step", "average"}
            assert metrics["kv_per_step/agreement"] == 1.0 and metrics["kv_per_step/nll_gap"] == 0.0
            for strategy, values in kv.items():
                for key in ("nll", "nll_gap", "agreement", "first_divergence"):
                    assert metrics[f"kv_{strategy}/{key}"] == pytest.approx(values[key])

    # Independently: greedy decoding by full recomputation (no cache) gives per_step's tokens, and last_step's
    # agreement with them is the recorded one.
    from looplm.model import generate, load_pretrained
    from looplm.model.tokenizer import load_tokenizer
    from looplm.pipelines.studies import build_data

    step = experiment.step("train.shared_kv.s1")
    saved = Path(result.folders["train.shared_kv.s1"]) / "hf"
    model, tokenizer = load_pretrained(saved), load_tokenizer(saved)
    items = build_data(step.config.data, step.config.eval).test[: step.config.eval.kv_prompts]
    new_tokens = step.config.eval.kv_new_tokens
    agreements = []
    with torch.no_grad():
        for question, _ in items:
            ids = tokenizer.encode(question).ids
            reference = []
            for _ in range(new_tokens):
                logits = model(torch.tensor([ids + reference])).logits[-1]
                reference.append(int(logits[0, -1].argmax()))
            shared = generate(model, [ids], max_new_tokens=new_tokens, kv_cache="last_step").tokens[0]
            agreements.append(sum(a == b for a, b in zip(shared, reference, strict=True)) / new_tokens)
    kv = result.records["train.shared_kv.s1"].kv
    assert kv["last_step"]["agreement"] == pytest.approx(sum(agreements) / len(agreements))

    report = nested["report"]
    plots = report_plots(client, report, Path(result.folders["report"]))
    assert "kv_sharing.png" in plots
    table = json.loads((Path(result.folders["report"]) / "study.json").read_text())
    for arm in arms:
        seeds = [result.records[f"train.{arm}.s{s}"].kv["last_step"]["nll_gap"] for s in (0, 1)]
        assert table["models"][arm]["kv"]["last_step"]["nll_gap"] == pytest.approx(sum(seeds) / 2)
