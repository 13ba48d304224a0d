"""Every CPU adaptation megatron-core 0.16.1 needs, in one place, applied only when CUDA is absent.

megatron-core assumes a GPU in a handful of places (reference/megatron-on-cpu.md §2-4). On a CPU-only torch each
of them raises "Torch not compiled with CUDA enabled". `apply()` patches exactly these, once per process, and
does nothing at all when CUDA is available, so a GPU run executes unmodified megatron-core. It patches the whole
process, so it is called explicitly where a process starts (a Ray Train worker, a spawned test rank, a bench
script), never from a constructor; the model and `initialize_model_parallel` only `check()` that it ran:

1. `torch.cuda.current_device()` -> the CPU device. About 175 call sites allocate with
   `device=torch.cuda.current_device()`: RoPE's inv_freq on every forward, the attention buffer, p2p buffers.
2. `torch.cuda.synchronize()` -> no-op (p2p communication calls it).
3. The model-parallel RNG tracker -> one backed by the CPU generator. Attention forks the tracker even at
   dropout 0, `model_parallel_cuda_manual_seed` reads CUDA RNG state, and activation recompute saves it.
4. The `device="cuda"` literal in `pipeline_parallel/schedules.py` (token counter of every schedule); the
   current_device patch cannot reach a string literal. Needed by every schedule from
   `get_forward_backward_func` (the trainer steps through them).

5. Megatron's optimizers (`megatron.core.optimizer`: FP32Optimizer, Float16OptimizerWithFloat16Params,
   DistributedOptimizer) hard-code CUDA in four modules: `device='cuda'` literals for their scalar buffers,
   `param.type() == 'torch.cuda.FloatTensor'` checks and one `.cuda()` in the checkpoint gather.
   `patch_megatron_optimizer()` re-executes those modules' source with exactly these strings rewritten for the
   CPU. It runs only when a CPU run asks for the Megatron optimizer (`optim.implementation: megatron`, what
   every GPU run uses), so CPU tests exercise the GPU code path; the default CPU optimizer is torch AdamW over
   Megatron DDP's gradients and needs no patch. Every rewrite is counted against the pinned megatron-core
   0.16.1 source, so an upgrade that moves a literal fails loudly here instead of half-patching.

Sequence parallelism needs no patch because looplm's norms are its own modules (layer_specs.RMSNorm), not
megatron's WrappedTorchNorm.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

import torch

_applied = False
_optimizer_patched = False


def needed() -> bool:
    """True on a machine where megatron-core cannot run unpatched."""
    return not torch.cuda.is_available()


def check() -> None:
    """Raise, naming the fix, when this machine needs the patches and nobody applied them (never patches)."""
    if needed() and not _applied:
        raise RuntimeError(
            "megatron-core needs its CPU patches on this machine (no CUDA): call "
            "looplm.model.megatron.cpu_shim.apply() once where the process starts (a worker, a test, a script)"
        )


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


# module -> the number of CUDA-only strings its 0.16.1 source holds (device literals + tensor type names).
_OPTIMIZER_MODULES = {
    "megatron.core.optimizer.clip_grads": 6,
    "megatron.core.optimizer.grad_scaler": 4,
    "megatron.core.optimizer.optimizer": 7,
    "megatron.core.optimizer.distrib_optimizer": 6,
}
_CPU_SPELLINGS = {
    "device='cuda'": "device='cpu'",
    "'torch.cuda.FloatTensor'": "'torch.FloatTensor'",
    "'torch.cuda.HalfTensor'": "'torch.HalfTensor'",
    "'torch.cuda.BFloat16Tensor'": "'torch.BFloat16Tensor'",
    "send_tensor = send_tensor.cuda()": "send_tensor = send_tensor",  # DP gather of a checkpoint's state
}


def patch_megatron_optimizer() -> bool:
    """Make megatron.core.optimizer run on CPU (item 5 above) if CUDA is absent; idempotent. Returns whether active."""
    global _optimizer_patched
    if not needed():
        return False
    if _optimizer_patched:
        return True
    apply()
    from megatron.core import utils as mcore_utils

    def local_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        # utils.local_multi_tensor_l2_norm (the fallback without apex/TE) puts its result on device="cuda";
        # clip_grads imports it by name when its module source is re-executed below.
        norms = [torch.norm(tensor) for tensor_list in tensor_lists for tensor in tensor_list]
        total = torch.norm(torch.stack(norms)) if norms else torch.zeros(())
        return total.reshape(1).float(), None

    mcore_utils.local_multi_tensor_l2_norm = local_multi_tensor_l2_norm
    for name, expected in _OPTIMIZER_MODULES.items():
        module = importlib.import_module(name)
        source = inspect.getsource(module)
        found = sum(source.count(cuda) for cuda in _CPU_SPELLINGS)
        if found != expected:
            raise RuntimeError(
                f"cpu_shim: {name} holds {found} CUDA-only strings, expected {expected} (megatron-core 0.16.1); "
                "re-check patch_megatron_optimizer against this megatron-core version"
            )
        for cuda, cpu in _CPU_SPELLINGS.items():
            source = source.replace(cuda, cpu)
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    # Names bound before the rewrite (the package namespace, and the subclass's base) must see the new classes.
    import megatron.core.optimizer as package
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for name in (
        "MegatronOptimizer",
        "MixedPrecisionOptimizer",
        "Float16OptimizerWithFloat16Params",
        "FP32Optimizer",
        "ChainedOptimizer",
    ):
        if hasattr(package, name):
            setattr(package, name, getattr(optimizer, name))
    package.DistributedOptimizer = distrib_optimizer.DistributedOptimizer
    _optimizer_patched = True
    return True
