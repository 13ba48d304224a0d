"""The LoopLM on megatron-core 0.16.1: tensor, sequence, pipeline and data parallelism, checkpoints, conversion.

    config.py        ParallelConfig: TP / SP / PP sizes, `transformer_impl` (local | transformer_engine), precision
    cpu_shim.py      the only CPU adaptations of megatron-core, applied only when CUDA is absent
    layer_specs.py   the Ouro sandwich layer (four RMSNorms) as megatron submodules, per implementation
    fp8.py           FP8 recipes, the real-FP8 linear of the local spec, where FP8 can run (TE or local)
    model.py         MegatronLoopLM (one pipeline stage): the T-step loop, per-step vocab-parallel head + CE, exit gate
    losses.py        Stage I and Stage II objectives (equal to looplm.model.objectives)
    pipeline.py      the loop around the pipeline: loop t = virtual chunk t, chunks sharing the stage's weights
    convert.py       Ouro HF layout <-> Megatron state at any TP x PP
    checkpointing.py model-only dist_checkpointing save/load, Ouro HF export / import (training checkpoints:
                     looplm.pipelines.training.checkpoints)
    distributed.py   process groups and Megatron DDP

Submodules import megatron-core (a few seconds); this package itself imports nothing heavy.
"""

from .config import ParallelConfig

__all__ = ["ParallelConfig"]
