"""The process group of a Ray Train job: on one node it listens on loopback only, or uses no TCP at all.

Ray Train's TorchConfig (2.60, ray/train/torch/config.py) rendezvouses through `env://`: torch's TCPStore on the
rank-0 worker, which listens on every interface whatever MASTER_ADDR says (a plain
`TCPStore("127.0.0.1", 0, is_master=True)` does too), and gloo picks its interface from the host name. So a
single-node job, the embedded default and the tests, opened a port on the machine's outward addresses.

`ProcessGroupConfig` is a TorchConfig whose backend, when every worker shares one node and no interface is named,
lets the ranks meet in a FileStore (a fresh file in rank 0's temp folder: no socket) and binds gloo / NCCL to
`lo`. With `network_interface` (launch.network_interface; a multi-node job) gloo and NCCL bind that interface and
the rendezvous is Ray Train's own, whose TCPStore listens on every interface of the rank-0 node: keep that node
behind the cluster's firewall (README, "Network exposure").
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend


def _set_environment(env: dict[str, str]) -> None:
    os.environ.update(env)


def _new_store_file() -> str:
    """A fresh FileStore path on rank 0's node (a store file left by a crashed group must not be reused)."""
    return str(Path(tempfile.gettempdir()) / f"looplm-store-{uuid.uuid4().hex}")


def _remove_file(path: str) -> None:
    Path(path).unlink(missing_ok=True)


class _LocalFirstBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        workers = worker_group.get_workers()
        one_node = len({worker.metadata.node_id for worker in workers}) == 1
        interface = backend_config.network_interface or ("lo" if one_node else None)
        if interface is not None:
            worker_group.execute(_set_environment, {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface})
        if not one_node or backend_config.network_interface is not None:
            super().on_start(worker_group, backend_config)
            return
        self._store = worker_group.execute_single(0, _new_store_file)
        worker_group.execute(_set_torch_distributed_env_vars)  # RANK, LOCAL_RANK, ... as Ray Train's on_start sets
        setups = [
            worker_group.execute_single_async(
                rank,
                _setup_torch_process_group,
                backend=backend_config.backend,
                world_rank=rank,
                world_size=len(workers),
                init_method=f"file://{self._store}",
                timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(workers))
        ]
        ray.get(setups)

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        super().on_shutdown(worker_group, backend_config)
        store = getattr(self, "_store", None)
        if store is not None:  # torch removes it when the last rank closes cleanly; a crash leaves it behind
            with contextlib.suppress(Exception):
                worker_group.execute_single(0, _remove_file, store)


@dataclass
class ProcessGroupConfig(TorchConfig):
    network_interface: str | None = None  # None: loopback and a FileStore when all workers share one node

    @property
    def backend_cls(self):
        return _LocalFirstBackend
