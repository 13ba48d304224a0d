"""Run a function on N real gloo ranks (spawned processes on 127.0.0.1, a free port per call) and collect results.

    results = run_ranks(worker_fn, world_size=2, tmp_path=tmp_path, **kwargs)   # one result per rank

`worker_fn(rank, world_size, **kwargs)` runs after `init_process_group("gloo")` (or `backend="nccl"`, one GPU
per rank) and megatron's CPU patches (`cpu_shim.apply()`, a no-op with CUDA) in each child and returns something
torch.save can write. A failure on any rank fails the call with
that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

TIMEOUT_S = 300  # 8 ranks on 2 shared cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, out_dir: str, fn, kwargs: dict, backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank)
        from looplm.model.megatron import cpu_shim

        cpu_shim.apply()  # where the process starts, never from the code under test
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, **kwargs)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, tmp_path: Path, backend: str = "gloo", **kwargs) -> list:
    out_dir = Path(tmp_path) / f"ranks-{fn.__name__}-{free_port()}"
    out_dir.mkdir(parents=True)
    args = (world_size, free_port(), str(out_dir), fn, kwargs, backend)
    context = mp.spawn(_child, args=args, nprocs=world_size, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {TIMEOUT_S} s")
    except Exception as err:
        errors = []
        for rank in range(world_size):
            path = out_dir / f"rank{rank}.pt"
            if path.exists():
                record = torch.load(path, weights_only=False)
                if not record["ok"]:
                    errors.append(f"rank {rank}:\n{record['error']}")
        raise AssertionError("\n".join(errors) or str(err)) from None
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False)["result"] for r in range(world_size)]
