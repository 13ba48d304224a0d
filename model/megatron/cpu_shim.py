"""Every CPU adaptation megatron-core 0.16.1 needs, in one place, applied only when CUDA is absent.

megatron-core assumes a GPU in a handful of places (reference/megatron-on-cpu.md §2-4). On a CPU-only torch each
of them raises "Torch not compiled with CUDA enabled". `apply()` patches exactly these, once per process, and
does nothing at all when CUDA is available, so a GPU run executes unmodified megatron-core:

1. `torch.cuda.current_device()` -> the CPU device. About 175 call sites allocate with
   `device=torch.cuda.current_device()`: RoPE's inv_freq on every forward, the attention buffer, p2p buffers.
2. `torch.cuda.synchronize()` -> no-op (p2p communication calls it).
3. The model-parallel RNG tracker -> one backed by the CPU generator. Attention forks the tracker even at
   dropout 0, `model_parallel_cuda_manual_seed` reads CUDA RNG state, and activation recompute saves it.
4. The `device="cuda"` literal in `pipeline_parallel/schedules.py` (token counter of every schedule); the
   current_device patch cannot reach a string literal. Needed as soon as a schedule from
   `get_forward_backward_func` runs (pipeline parallelism, next issue).

Deliberately absent: Megatron's optimizers hard-code CUDA in four modules; on CPU the trainer uses torch AdamW
over Megatron DDP's gradients instead of rewriting their source. Sequence parallelism needs no patch because
looplm's norms are its own modules (layer_specs.RMSNorm), not megatron's WrappedTorchNorm.
"""

from __future__ import annotations

import contextlib

import torch

_applied = False


def needed() -> bool:
    """True on a machine where megatron-core cannot run unpatched."""
    return not torch.cuda.is_available()


def apply() -> bool:
    """Patch megatron-core for CPU if (and only if) CUDA is absent; idempotent. Returns whether patches are active."""
    global _applied
    if not needed():
        return False
    if not _applied:
        _patch_current_device()
        _patch_rng_tracker()
        _patch_schedules_cuda_literal()
        _applied = True
    return True


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    class CPURNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """The model-parallel RNG tracker on the CPU generator: named states forked and restored."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    # fork() and activation recompute (CheckpointFunction) go through these module-level helpers.
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mp_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _patch_schedules_cuda_literal() -> None:
    from megatron.core.pipeline_parallel import schedules

    class _TorchOnCPU:
        """`torch` as schedules.py sees it, with zeros(device="cuda") landing on the CPU."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*args, device=None, **kwargs):
            return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    schedules.torch = _TorchOnCPU()
