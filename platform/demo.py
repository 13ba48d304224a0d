"""The embedded demo (`make demo`): configs/demo.yaml through the step executor, every step real.

    python -m looplm.platform.demo [--keep] [--root DIR] [k=v ...]

It starts a local Ray bound to 127.0.0.1 and an MLflow server on 127.0.0.1 (store: runs/mlflow; an
MLFLOW_TRACKING_URI that answers is used instead), then runs the experiment: curation on Ray Data over the
generated corpus with planted defects, the tokenizer and packing, the tiny LoopLM on megatron-core on Ray Train
(one CPU worker), Stage II, evaluation (per-step metrics, early-exit curves), registration and a Ray Serve
deployment, then sends one completion through the official `openai` client. A second run is all cache hits up to
the deployment. At the end it prints what each step produced, the key metrics, the MLflow UI and endpoint
addresses and how to start things again, and stops the servers it started unless --keep (then it serves until
Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .experiment import DEMO, load_experiment, run_experiment


def summary(experiment, result, seconds: float, tracking_uri: str) -> str:
    records, folders = result.records, result.folders
    lines = [f"pipeline: {seconds:.0f} s ({sum(row[1] == 'cached' for row in result.table)} steps cached)"]
    curated = records.get("curate")
    if curated is not None:
        tokens = {name: int(d["train_tokens"]) for name, d in curated.datasets.items()}
        lines.append(
            f"  curate    {curated.documents_kept} documents kept, {curated.documents_removed} removed; "
            f"train tokens {tokens}; vocabulary {curated.vocab_size}"
        )
    for name in ("pretrain", "gate"):
        trained = records.get(name)
        if trained is not None:
            valid = f", validation loss {trained.valid_loss:.3f}" if trained.valid_loss is not None else ""
            lines.append(
                f"  {name:<9} {trained.objective}, {trained.steps} steps: final loss {trained.final_loss:.3f}{valid}"
                f"; HF export {Path(folders[name]) / trained.hf}"
            )
    evaluated = records.get("evaluate")
    if evaluated is not None:
        per_step = [evaluated.metrics[k] for k in sorted(evaluated.metrics) if k.startswith("loss_step_")]
        lines.append(
            f"  evaluate  loss at T={evaluated.trained_steps}: {evaluated.metrics.get('val_loss', float('nan')):.3f}, "
            f"accuracy {evaluated.metrics.get('val_acc', float('nan')):.3f}; loss by step "
            + " ".join(f"{v:.2f}" for v in per_step)
        )
    registered = records.get("register")
    if registered is not None:
        lines.append(f"  register  {registered.model_uri} (alias {registered.alias})")
    endpoint = records.get("deploy")
    if endpoint is not None:
        lines.append(
            f"  deploy    {endpoint.base_url} serves {endpoint.served} as {endpoint.model!r} ({endpoint.kv_cache})"
        )
    lines += [
        f"MLflow: {tracking_uri} (pipeline run {result.run_id})",
        "again: `make demo` (cached up to the deployment), `looplm run configs/demo.yaml --force pretrain`,",
        "       `looplm status configs/demo.yaml`, `looplm mlflow` (the UI on runs/mlflow)",
    ]
    return "\n".join(lines)


def ask_endpoint(endpoint, prompt: str = "Alice Smith was born on") -> str:
    """One completion through the official `openai` client, as an application would call the endpoint."""
    from openai import OpenAI

    client = OpenAI(base_url=endpoint.base_url, api_key="unused")  # the demo deployment sets no API keys
    completion = client.completions.create(model=endpoint.model, prompt=prompt, max_tokens=24, temperature=0)
    steps = getattr(completion.usage, "average_recurrent_steps", None)
    depth = f"; {steps:.2f} recurrent steps per token" if steps is not None else ""
    return f"openai client: {prompt!r} -> {completion.choices[0].text!r}{depth}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="looplm demo", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps.pretrain.config.train.steps=50")
    parser.add_argument("--keep", action="store_true", help="keep MLflow and the endpoint up (serve until Ctrl-C)")
    parser.add_argument("--root", help="where step outputs go (default: the experiment's root, runs/demo)")
    parser.add_argument("--force", action="append", default=[], metavar="STEP", help="rerun STEP and downstream")
    args = parser.parse_args(argv)
    return run_demo(args.overrides + ([f"root={args.root}"] if args.root else []), keep=args.keep, force=args.force)


def run_demo(overrides: list[str], *, keep: bool = False, force: list[str] | None = None) -> int:
    from looplm.infra.mlflow_server import ensure_tracking_server
    from looplm.infra.ray_cluster import ray_session

    experiment = load_experiment(DEMO, overrides)
    tracking_uri, server = ensure_tracking_server()
    try:
        env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
        # With its dashboard on 127.0.0.1: the State API Ray Train's placement-group cleaner polls, and a UI.
        with ray_session(include_dashboard=True, runtime_env={"env_vars": env}) as ray_info:
            print(f"local Ray at {ray_info.address}; MLflow at {tracking_uri}", flush=True)
            started = time.perf_counter()
            result = run_experiment(experiment, force=force, tracking_uri=tracking_uri)
            seconds = time.perf_counter() - started
            print(summary(experiment, result, seconds, tracking_uri), flush=True)
            endpoint = result.records.get("deploy")
            if endpoint is not None:
                print(ask_endpoint(endpoint), flush=True)
                if keep and ray_info.started_local:
                    _serve_until_interrupted(endpoint)
    finally:
        if server is not None and not keep:
            server.stop()
            print("stopped the MLflow server this demo started (`looplm mlflow` serves runs/mlflow again)")
        elif server is not None:
            print(f"MLflow server kept at {server.url} (pid {server.pid}); stop it with `kill {server.pid}`")
    return 0


def _serve_until_interrupted(endpoint) -> None:
    playground = endpoint.base_url.removesuffix("/v1") + "/"
    print(f"serving {endpoint.base_url} (playground: {playground}) until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the endpoint and the local Ray", flush=True)


def run_from_args(args: argparse.Namespace) -> int:
    """`looplm demo [--output ROOT]`."""
    return run_demo([f"root={args.output}"] if args.output else [])


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    raise SystemExit(main())
