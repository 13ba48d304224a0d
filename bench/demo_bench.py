"""The demo pipeline's two figures: a first run of configs/demo.yaml on an empty root, then a second run (all cache
hits), side by side. What `make demo` runs, minus the venv: a local Ray on 127.0.0.1 and an MLflow server, started
once before both runs (their start-up is timed apart).

    .venv/bin/python bench/demo_bench.py [--root DIR] [k=v ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from looplm.infra.mlflow_server import MlflowServer, MlflowServerConfig
from looplm.infra.ray_cluster import ray_session
from looplm.platform.experiment import DEMO, load_experiment, run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--root", help="an empty folder for the step outputs (default: a new temporary folder)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="looplm-demo-bench-"))
    experiment = load_experiment(DEMO, [*args.overrides, f"root={root}"])
    started = time.perf_counter()
    server = MlflowServer(MlflowServerConfig(root=str(root / "mlflow"))).start()
    try:
        with ray_session(runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}):
            startup = time.perf_counter() - started
            timings = []
            for _ in range(2):
                began = time.perf_counter()
                result = run_experiment(experiment, tracking_uri=server.url)
                timings.append((time.perf_counter() - began, result))
    finally:
        server.stop()
    (first, run1), (second, run2) = timings
    print(f"\nroot {root}")
    print("| step | first run | second run |")
    print("|---|---:|---:|")
    for row1, row2 in zip(run1.table, run2.table, strict=True):
        print(f"| {row1[0]} | {row1[2]} ({row1[1]}) | {row2[2]} ({row2[1]}) |")
    print(f"| Ray + MLflow start-up (once) | {startup:.1f}s | |")
    print(f"| **pipeline** | **{first:.1f}s** | **{second:.1f}s** |")
    print(f"| second / first | | {second / first:.3f} |")


if __name__ == "__main__":
    main()
