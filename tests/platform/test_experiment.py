"""Experiments and overrides without running anything: the one override parser, the YAML onto the frozen configs,
and the Ouro recipe chain (its hand-offs by hash)."""

from __future__ import annotations

from pathlib import Path

import pytest

from looplm.infra.configs import ConfigFileError, apply_overrides, load_config
from looplm.pipelines.curate import CurateConfig
from looplm.platform.executor import Storage, plan
from looplm.platform.experiment import DEMO, load_experiment

REPO = Path(__file__).resolve().parents[2]


def test_overrides_index_lists_by_position_and_name_and_leave_the_input_alone():
    data = {"sources": [{"name": "a", "count": 1}, {"name": "b", "count": 2}], "seed": 0}
    out = apply_overrides(data, ["sources.0.count=5", "sources.b.noise.spam=0.1", "seed=3", "new.key=[1, 2]"])
    assert out == {
        "sources": [{"name": "a", "count": 5}, {"name": "b", "count": 2, "noise": {"spam": 0.1}}],
        "seed": 3,
        "new": {"key": [1, 2]},
    }
    assert data["sources"][0]["count"] == 1  # not modified
    with pytest.raises(ConfigFileError, match=r"sources has 2 items, no item 2"):
        apply_overrides(data, ["sources.2.count=1"])
    with pytest.raises(ConfigFileError, match=r"sources has no item named 'c' \(names: a, b\)"):
        apply_overrides(data, ["sources.c.count=1"])
    with pytest.raises(ConfigFileError, match="not of the form dotted.key=value"):
        apply_overrides(data, ["seed"])


def test_a_list_the_file_leaves_to_defaults_can_still_be_indexed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")  # no sources: the defaults' sources are indexed
    config = load_config(CurateConfig, path, ["sources.mano.count=9", "sources.0.weight=0.5"])
    defaults = CurateConfig().sources
    assert [s.name for s in config.sources] == [s.name for s in defaults]
    assert config.sources[2].count == 9 and config.sources[0].weight == 0.5


def test_the_demo_experiment_maps_onto_the_configs_with_step_placeholders():
    experiment = load_experiment(DEMO)
    assert [s.name for s in experiment.steps] == ["curate", "pretrain", "gate", "evaluate", "register", "deploy"]
    gate = experiment.step("gate")
    assert gate.config.data.manifest == "@curate" and gate.config.train.init_from_hf == "@pretrain"
    assert {role: up.name for role, up in gate.inputs.items()} == {"data": "curate", "init": "pretrain"}
    assert experiment.step("evaluate").config.model == "@gate"
    deploy = experiment.step("deploy")
    assert deploy.inputs["model"].name == "register" and not deploy.cacheable
    assert experiment.step("pretrain").num_cpus == 0  # starts Ray Train from inside its task
    assert experiment.step("curate").num_cpus == 0  # Ray Data schedules its own tasks
    # The local executor's pool runs inside the step's task, which therefore reserves the pool's CPUs.
    local = load_experiment(DEMO, ["steps.curate.config.executor=local", "steps.curate.config.num_cpus=2"])
    assert local.step("curate").num_cpus == 2


def test_the_ouro_recipe_is_one_chain_handing_off_by_hash(tmp_path):
    experiment = load_experiment(REPO / "configs" / "ouro-recipe.yaml", [f"root={tmp_path}"])
    names = [s.name for s in experiment.steps]
    assert names[:5] == [f"ouro-1.4b-stage{s}" for s in ("1a", "1b", "2", "3", "4")]
    assert "ouro-2.6b-upcycled" in names and names[-1] == "ouro-2.6b-stage4"
    stage2 = experiment.step("ouro-1.4b-stage2")
    assert stage2.config.train.init_from_hf == "@ouro-1.4b-stage1b"  # the file's typed path is replaced
    assert stage2.config.data.seq_len == 16384 and stage2.config.model.preset == "ouro-1.4b"
    assert experiment.step("ouro-2.6b-stage1b").inputs["init"].name == "ouro-2.6b-upcycled"
    planned = plan(list(experiment.steps), Storage.at(experiment.root))
    assert all(p.action == "run" for p in planned) and len({p.hash for p in planned}) == len(planned)
    # One field of Stage 1a changes every hash downstream of it, and only those.
    changed = load_experiment(
        REPO / "configs" / "ouro-recipe.yaml", [f"root={tmp_path}", "steps.ouro-1.4b-stage3.config.optim.lr=0.0001"]
    )
    before = {p.step.name: p.hash for p in planned}
    after = {p.step.name: p.hash for p in plan(list(changed.steps), Storage.at(changed.root))}
    assert {n for n in before if before[n] != after[n]} == {"ouro-1.4b-stage3", "ouro-1.4b-stage4"}
