"""Fixtures shared by the tracking, evaluation, registry and lm-eval tests (a plugin: tests/conftest.py loads it).

- `mlflow_server`: one real `mlflow server` subprocess on 127.0.0.1 (a free port, sqlite store in a temporary
  folder, job consumers off) for the whole session, stopped by its process group when the session ends.
- `trained_tiny`: the `tiny` LoopLM trained on synthetic biographies as the demo does, but shorter: a Stage I
  checkpoint, then the same LM after Stage II gate training; both saved with their tokenizer.

Both are session-scoped: the server starts and the model trains once, on first use.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Nothing may be downloaded at run time, and MLflow must not try to phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("looplm-mlflow-tests")
    os.environ.setdefault("LOOPLM_MODEL_CACHE", str(folder / "model-cache"))
    return folder


@pytest.fixture(scope="session")
def mlflow_server(session_folder: Path):
    from looplm.infra.mlflow_server import MlflowServer, MlflowServerConfig

    server = MlflowServer(MlflowServerConfig(root=str(session_folder / "mlflow"))).start()
    yield server
    server.stop()


@dataclass(frozen=True)
class TrainedTiny:
    stage1: Path  # checkpoint after Stage I (LM and gate)
    stage2: Path  # the same LM after Stage II (gate only)
    valid: torch.Tensor  # held-out packed rows [n, seq_len + 1]


@pytest.fixture(scope="session")
def trained_tiny(session_folder: Path) -> TrainedTiny:
    # One thread: on 2 cores shared with other jobs, two threads thrash (measured 4x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_tiny(session_folder / "tiny")
    finally:
        torch.set_num_threads(threads)


def _train_tiny(folder: Path) -> TrainedTiny:
    from looplm.model import LoopLM, LoopLMConfig
    from looplm.model.tokenizer import END_OF_DOCUMENT, PAD, special_token_id, train_byte_level_bpe
    from looplm.pipelines import synthetic
    from looplm.pipelines.reference_train import TrainSettings, pack_documents, train

    torch.manual_seed(0)
    texts = synthetic.biographies(300, seed=0, exposures=4)
    config = LoopLMConfig.preset("tiny")
    tokenizer = train_byte_level_bpe(texts, config.vocab_size)
    eod = special_token_id(tokenizer, END_OF_DOCUMENT)
    config = dataclasses.replace(
        config, bos_token_id=eod, eos_token_id=eod, pad_token_id=special_token_id(tokenizer, PAD)
    )
    rows = pack_documents((e.ids for e in tokenizer.encode_batch(texts)), eod, 64)
    valid, train_rows = rows[:16], rows[16:]
    model = LoopLM(config)
    train(model, train_rows, TrainSettings(steps=100, batch_size=16, lr=3e-3, warmup_steps=10, beta=0.05))
    stage1 = model.save_pretrained(folder / "stage1", tokenizer=tokenizer)
    train(model, train_rows, TrainSettings(steps=30, batch_size=16, lr=1e-2, warmup_steps=3, stage="stage2"))
    stage2 = model.save_pretrained(folder / "stage2", tokenizer=tokenizer)
    return TrainedTiny(stage1=stage1, stage2=stage2, valid=valid)
