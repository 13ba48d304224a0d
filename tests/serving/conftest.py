"""A tiny random LoopLM saved in the Ouro HF layout with a byte-level BPE tokenizer (session-scoped).

Training is not needed to test serving: the model only has to be a real LoopLM whose exit gate spreads
exits over the steps (its gate weights are scaled up), so that early exit skips passes on some tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from looplm.model import LoopLM, LoopLMConfig
from looplm.model.tokenizer import END_OF_DOCUMENT, PAD, special_token_id, train_byte_level_bpe


def tiny_model(vocab_size: int = 512, eos: int = 0, pad: int = 3) -> LoopLM:
    config = LoopLMConfig.preset(
        "tiny", vocab_size=vocab_size, max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad
    )
    torch.manual_seed(1)
    model = LoopLM(config)
    with torch.no_grad():
        model.model.early_exit_gate.weight.mul_(40)  # a gate that spreads exits over the steps
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One torch thread: on 2 cores shared with other jobs, two threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_tiny_model():
    return tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from looplm.pipelines import synthetic

    tokenizer = train_byte_level_bpe(synthetic.biographies(60, seed=0), 512)
    eos, pad = special_token_id(tokenizer, END_OF_DOCUMENT), special_token_id(tokenizer, PAD)
    model = tiny_model(tokenizer.get_vocab_size(), eos, pad)
    assert dataclasses.asdict(model.config)["eos_token_id"] == eos
    return model.save_pretrained(tmp_path_factory.mktemp("serving") / "tiny", tokenizer=tokenizer)
