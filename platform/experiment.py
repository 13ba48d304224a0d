"""Experiments: a YAML file of steps mapped onto the frozen configs, run by the executor.

    looplm run configs/demo.yaml [steps.pretrain.config.train.steps=50 ...] [--dry-run] [--force STEP] [--until STEP]
    looplm status configs/demo.yaml

    name: demo                       # the MLflow pipeline run's name
    root: runs/demo                  # where step outputs live: a path or a pyarrow/fsspec URI (s3://...)
    steps:                           # in order; each step's inputs name earlier steps
      curate:   {kind: curate, config: {...CurateConfig...}}
      pretrain: {kind: pretrain, inputs: {data: curate}, config_file: train-tiny-cpu.yaml, config: {...}}
      ...

A step is `kind` (platform/steps.py KINDS), `inputs` (role -> step), and its config: `config_file` (a config
YAML, relative to the experiment file) with `config` merged over it. Overrides are dotted paths into the
experiment (`root=/data/runs`, `steps.curate.config.sources.0.count=500`); those under a step's config are
applied after the merge, with the config's defaults behind them, so a list item the file does not spell out can
be changed. Every error names the file and the field.

`quick:` (optional) is a list of overrides that `--quick` applies before the command line's: the same
experiment at test size (configs/studies/*.yaml). A step whose kind expands (a study matrix, steps.py) becomes
one step per member, `<step>.<member>`; a later step that names it as an input gets every member.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looplm.infra.configs import ConfigFileError, apply_overrides, build_config, read_yaml_mapping, to_dict

from .executor import LockSettings, PipelineResult, Step, Storage, format_plan, plan, run_steps, status_rows
from .steps import KINDS

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TOP_LEVEL = ("name", "root", "description", "steps", "quick")
STEP_KEYS = ("kind", "inputs", "config", "config_file")


@dataclass(frozen=True)
class Experiment:
    name: str
    root: str
    steps: tuple[Step, ...]  # in file order (each after its inputs)
    source: str  # the file it came from
    data: dict[str, Any]  # the resolved experiment as plain data (logged as the pipeline run's params)
    groups: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # matrix step -> its members

    def step(self, name: str, option: str = "") -> Step:
        """The step called `name`; `option` (--until, --force) says who asked, in the error for a name no step has."""
        for step in self.steps:
            if step.name == name:
                return step
        asked = f"{option} {name}: " if option else ""
        raise ConfigFileError(
            f"{asked}{self.source} has no step named {name!r}; steps are {', '.join(s.name for s in self.steps)}"
        )

    def named(self, name: str, option: str = "") -> list[Step]:
        """The step of that name, or every member of the matrix of that name."""
        if name in self.groups:
            return [self.step(member) for member in self.groups[name]]
        return [self.step(name, option)]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _defaults(cls: type) -> dict[str, Any] | None:
    try:
        return to_dict(cls())
    except (TypeError, ValueError):
        return None


def load_experiment(path: str | Path, overrides: list[str] | None = None, *, quick: bool = False) -> Experiment:
    path = Path(path)
    overrides = list(overrides or [])
    if quick:
        preset = read_yaml_mapping(path, "experiment file").get("quick")
        if not isinstance(preset, list) or not preset or not all(isinstance(o, str) for o in preset):
            raise ConfigFileError(f"{path}: --quick needs a `quick:` list of overrides (dotted.key=value) in the file")
        overrides = [*preset, *overrides]
    step_overrides = [o for o in overrides if o.startswith("steps.") and ".config." in o.partition("=")[0]]
    top_overrides = [o for o in overrides if o not in step_overrides]
    data = apply_overrides(read_yaml_mapping(path, "experiment file"), top_overrides)
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise ConfigFileError(f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL)}")
    name = data.get("name") or path.stem
    root = str(data.get("root") or Path("runs") / name)
    entries = data.get("steps")
    if not isinstance(entries, dict) or not entries:
        raise ConfigFileError(f"{path}: steps must be a mapping of step name -> step")
    steps: dict[str, Step] = {}
    groups: dict[str, tuple[str, ...]] = {}
    resolved: dict[str, Any] = {}
    for step_name, entry in entries.items():
        where = f"{path}: steps.{step_name}"
        if not isinstance(entry, dict):
            raise ConfigFileError(f"{where}: expected a mapping with kind, inputs, config")
        bad = sorted(set(entry) - set(STEP_KEYS))
        if bad:
            raise ConfigFileError(f"{where}: unknown field(s) {', '.join(bad)}; known: {', '.join(STEP_KEYS)}")
        kind_name = entry.get("kind")
        if kind_name not in KINDS:
            raise ConfigFileError(f"{where}.kind: {kind_name!r} is not one of {', '.join(KINDS)}")
        kind = KINDS[kind_name]
        inputs = entry.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise ConfigFileError(f"{where}.inputs: expected a mapping of role -> step name")
        for role, upstream in inputs.items():
            if role not in kind.roles:
                raise ConfigFileError(
                    f"{where}.inputs.{role}: a step of kind {kind_name} takes {', '.join(kind.roles) or 'no inputs'}"
                )
            if upstream not in steps and upstream not in groups:
                raise ConfigFileError(f"{where}.inputs.{role}: {upstream!r} is not an earlier step")
            if upstream in groups and role not in kind.many:
                raise ConfigFileError(f"{where}.inputs.{role}: {upstream!r} is a matrix of steps; {role} takes one")
        missing = [r for r in kind.required if r not in inputs]
        if missing:
            raise ConfigFileError(f"{where}.inputs: a step of kind {kind_name} needs {', '.join(missing)}")
        config_data: dict[str, Any] = {}
        if entry.get("config_file"):
            config_data = read_yaml_mapping(path.parent / entry["config_file"], f"{where}.config_file:")
        config_data = _merge(config_data, entry.get("config") or {})
        prefix = f"steps.{step_name}.config."
        mine = [o[len(prefix) :] for o in step_overrides if o.startswith(prefix)]
        config_data = kind.fill(apply_overrides(config_data, mine, _defaults(kind.config)), inputs)
        config = build_config(kind.config, config_data, f"{where}.config")
        resolved[step_name] = {"kind": kind_name, "inputs": inputs, "config": to_dict(config)}
        upstream_steps: dict[str, Step] = {}
        for role, upstream in inputs.items():
            if upstream in groups:
                upstream_steps.update({f"{role}/{member}": steps[member] for member in groups[upstream]})
            else:
                upstream_steps[role] = steps[upstream]
        members = kind.expand(config, f"{where}.config") if kind.expand is not None else [(None, config)]
        for suffix, member_config in members:
            member = step_name if suffix is None else f"{step_name}.{suffix}"
            if member in steps:
                raise ConfigFileError(f"{where}: the step name {member!r} is taken")
            steps[member] = Step(
                member,
                kind.fn,
                member_config,
                inputs=upstream_steps,
                num_cpus=kind.num_cpus(member_config) if callable(kind.num_cpus) else kind.num_cpus,
                cacheable=kind.cacheable,
            )
        if kind.expand is not None:
            groups[step_name] = tuple(f"{step_name}.{suffix}" for suffix, _ in members)
            resolved[step_name]["members"] = list(groups[step_name])
    stray = [o for o in step_overrides if not any(o.startswith(f"steps.{name}.config.") for name in entries)]
    if stray:
        raise ConfigFileError(f"{path}: override(s) {', '.join(stray)} name no step; steps are {', '.join(entries)}")
    data = {"name": name, "root": root, "steps": resolved}
    return Experiment(name, root, tuple(steps.values()), str(path), data, groups)


def check_steps(experiment: Experiment, steps: list[Step], force: list[str]) -> None:
    """The files each step that will run names in its own config (a curate step's input files, a pretrain step's
    datasets and starting checkpoint), checked before Ray starts: a missing one would otherwise end the step
    inside a Ray task, as a traceback, after the steps before it ran. A field an upstream step fills (`@step`) is
    not checked, nor is a step that is done (its inputs may be gone; it is not rerun)."""
    from looplm.model.checkpoint import CheckpointError
    from looplm.model.config import ConfigError
    from looplm.pipelines.curate import CurateConfig
    from looplm.pipelines.curate import check_inputs as check_curate
    from looplm.pipelines.pretrain_inputs import check_inputs as check_pretrain
    from looplm.pipelines.sources import SourceError
    from looplm.pipelines.training.config import PretrainConfig

    from .steps import PLACEHOLDER

    def filled(value: str | None) -> bool:
        return bool(value) and value.startswith(PLACEHOLDER)

    for planned in plan(steps, Storage.at(experiment.root), force):
        config = planned.step.config
        if planned.action != "run":
            continue
        try:
            if isinstance(config, CurateConfig):
                check_curate(config)
            elif isinstance(config, PretrainConfig):
                check_pretrain(
                    config, data=not filled(config.data.manifest), init=not filled(config.train.init_from_hf)
                )
        except (SourceError, ConfigError, CheckpointError) as err:
            raise ConfigFileError(f"{experiment.source}: steps.{planned.step.name}.config: {err}") from None


def run_experiment(
    experiment: Experiment,
    *,
    force: list[str] | None = None,
    until: str | None = None,
    dry_run: bool = False,
    tracking_uri: str | None = None,
    lock: LockSettings | None = None,
) -> PipelineResult | None:
    """Run (or with dry_run, only plan) the experiment's steps, all of them or `until` and its upstream."""
    for name in force or []:  # checked before anything runs or any MLflow run exists
        experiment.named(name, "--force")
    steps = experiment.named(until, "--until") if until else list(experiment.steps)
    force = [member for name in force or [] for member in experiment.groups.get(name, (name,))]
    if dry_run:
        print(format_plan(plan(steps, Storage.at(experiment.root), force or [])))
        return None
    check_steps(experiment, steps, force or [])
    return run_steps(
        steps,
        experiment.root,
        force=force or [],
        pipeline_name=experiment.name,
        tracking_uri=tracking_uri,
        config=experiment.data,
        lock=lock,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """`looplm run EXPERIMENT.yaml [k=v ...] [--quick] [--dry-run] [--force STEP] [--until STEP]`."""
    from looplm.infra.mlflow_server import check_tracking_server

    experiment = load_experiment(args.config, args.overrides, quick=args.quick)
    # as train and eval: a dead tracking server is refused before any step runs
    tracking_uri = None if args.dry_run else check_tracking_server()
    if not tracking_uri and not args.dry_run:
        print("MLFLOW_TRACKING_URI is not set: steps run untracked (`looplm mlflow` starts a server)")
    result = run_experiment(
        experiment, force=args.force, until=args.until, dry_run=args.dry_run, tracking_uri=tracking_uri
    )
    if result is not None and result.run_id:
        print(f"MLflow run {result.run_id} at {tracking_uri}")
    return 0


def status_from_args(args: argparse.Namespace) -> int:
    """`looplm status EXPERIMENT.yaml [k=v ...] [--quick]`: each step's state and output folder."""
    experiment = load_experiment(args.config, args.overrides, quick=args.quick)
    rows = status_rows(experiment.steps, experiment.root)
    width = max(len(r[0]) for r in rows)
    for name, state, folder in rows:
        print(f"{name:<{width}}  {state:<40}  {folder}")
    return 0
