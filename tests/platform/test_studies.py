"""The studies (docs/studies.md) as experiments: the quick multi-hop study runs through the executor on a real
local Ray with a real MLflow server; its MLflow runs, metrics and plots are checked, its exact match against the
reasoning evaluation's independent computation, and the gap's interval against scipy's Welch test.
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


@pytest.mark.slow
def test_quick_multihop_study_through_the_executor_lands_in_mlflow(tmp_path, mlflow_server, local_ray):
    from mlflow.tracking import MlflowClient

    experiment = load_experiment(MULTIHOP, [f"root={tmp_path}", "name=studies-test"], quick=True)
    result = run_experiment(experiment, tracking_uri=mlflow_server.url)

    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs(
        [client.get_experiment_by_name("looplm").experiment_id], "attributes.run_name LIKE 'studies-test%'"
    )
    parents = [r for r in runs if r.info.run_name == "studies-test"]
    assert len(parents) == 1 and parents[0].info.run_id == result.run_id
    nested = {r.data.tags["looplm.step"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.run_id}
    assert set(nested) == {f"train.{m}.s{s}" for m in MODELS for s in (0, 1)} | {"report"}
    for name, run in nested.items():
        assert run.info.status == "FINISHED", name
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
    plots = {Path(a.path).name for a in client.list_artifacts(report.info.run_id, "plots")}
    assert plots == {"exact_match_by_pass.png", "val_loss_by_pass.png", "compute_quality.png", "early_exit_looped.png"}
    folder = Path(result.folders["report"])
    for plot in plots:
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
