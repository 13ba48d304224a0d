"""Training the reference LoopLM in one process: CPU-sized runs, the demo, and Stage II gate training.

Scale-out pretraining is the Megatron-core trainer's job; this loop is the small, readable one. It packs
token streams into fixed-length sequences, then runs AdamW (0.9, 0.95, weight decay 0.1, clip 1.0) with a
linear warmup and cosine decay on the Stage I objective, or on the Stage II objective over the gate alone.

Loop-robust options (not in Ouro), the Megatron trainer's loop.* fields under the same names:
- random_steps (lo, hi): each step's T uniform on lo..hi, drawn by `schedules.drawn_recurrent_steps` from the run's
  seed and the step (the Megatron trainer draws the same T; the batches stay those of a fixed-T run);
- contraction_penalty, kv_consistency: weights of the Stage I terms of `looplm.model.objectives`, logged unweighted
  as `contraction` and `kv_consistency`; the contraction probe of step s is drawn from `schedules.probe_seed_at`.
- shared_kv_loss: the weight of the Stage I loss of a forward run as `last_step` decoding runs (objectives.py),
  logged unweighted as `shared_kv`. An option of this trainer only, for the KV-sharing study: the Megatron
  trainer has no such field yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from looplm.model import LoopLM, gate_parameters, stage1_loss, stage2_loss

from .training import schedules
from .training.config import OptimConfig


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    beta: float = 0.05  # Stage I entropy weight (Ouro: 0.1 with T = 8, then 0.05)
    num_steps: int | None = None  # recurrent steps T; None: the model's total_ut_steps
    stage: str = "stage1"  # "stage1": LM and gate; "stage2": gate only, LM frozen
    seed: int = 0
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite losses before the run aborts
    random_steps: tuple[int, int] | None = None  # T of each step drawn from lo..hi inclusive; None: num_steps
    contraction_penalty: float = 0.0  # weight of the last pass's contraction estimate (Stage I)
    kv_consistency: float = 0.0  # weight of the step-t vs step-T keys and values term (Stage I)
    shared_kv_loss: float = (
        0.0  # weight of the loss of a forward run as `last_step` decodes (Stage I; no Megatron twin)
    )

    def __post_init__(self) -> None:
        if self.stage not in ("stage1", "stage2"):
            raise ValueError(f"stage must be 'stage1' or 'stage2', got {self.stage!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.random_steps is not None and not 1 <= self.random_steps[0] <= self.random_steps[1]:
            raise ValueError(f"random_steps (lo, hi) needs 1 <= lo <= hi, got {self.random_steps!r}")
        for name in ("contraction_penalty", "kv_consistency", "shared_kv_loss"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite weight >= 0, got {value!r}")
            if value > 0 and self.stage != "stage1":
                raise ValueError(f"{name} is a Stage I term; stage={self.stage!r} trains the exit gate alone")


def pack_documents(documents: Iterable[Sequence[int]], end_of_document: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents, each followed by end_of_document, into rows of seq_len + 1 tokens.

    Row r gives inputs row[:-1] and labels row[1:]. The tail that does not fill a row is dropped (and only it).
    """
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        stream.append(end_of_document)
    rows = len(stream) // (seq_len + 1)
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one sequence of {seq_len + 1}")
    return torch.tensor(stream[: rows * (seq_len + 1)], dtype=torch.long).view(rows, seq_len + 1)


def split_batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[:, :-1], rows[:, 1:]


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warmup to settings.lr, then cosine decay to min_lr_ratio * lr at the last step: the Megatron
    trainer's cosine schedule (training/schedules.py), so both trainers decay alike."""
    floor = settings.lr * settings.min_lr_ratio
    optim = OptimConfig(lr=settings.lr, min_lr=floor, schedule="cosine", warmup_steps=settings.warmup_steps)
    return schedules.lr_at(step, optim, settings.steps)


def train(
    model: LoopLM,
    sequences: torch.Tensor,
    settings: TrainSettings,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train in place on packed rows [n, seq_len + 1]; returns one record per logged step."""
    generator = torch.Generator().manual_seed(settings.seed)
    if settings.stage == "stage2":
        params = gate_parameters(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    model.train()
    history, bad_in_a_row, skipped = [], 0, 0
    for step in range(settings.steps):
        pick = torch.randint(0, sequences.shape[0], (settings.batch_size,), generator=generator)
        inputs, labels = split_batch(sequences[pick])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        num_steps = settings.num_steps
        if settings.random_steps is not None:
            num_steps = schedules.drawn_recurrent_steps(step, *settings.random_steps, settings.seed)
        if settings.stage == "stage1":
            out = stage1_loss(
                model,
                inputs,
                labels,
                beta=settings.beta,
                num_steps=num_steps,
                contraction_penalty=settings.contraction_penalty,
                kv_consistency=settings.kv_consistency,
                shared_kv_loss=settings.shared_kv_loss,
                probe_seed=schedules.probe_seed_at(step, settings.seed),
            )
        else:
            out = stage2_loss(model, inputs, labels, num_steps=num_steps)
        if not torch.isfinite(out.loss):
            bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
            if bad_in_a_row >= settings.max_bad_steps:
                raise RuntimeError(f"{bad_in_a_row} non-finite losses in a row (step {step}); aborting")
            optimizer.zero_grad(set_to_none=True)
            continue
        bad_in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        if step % settings.log_every == 0 or step == settings.steps - 1:
            record = {
                "step": step,
                "loss": out.loss.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm.item(),
                "entropy": out.entropy.item(),
                "skipped_steps": skipped,
                "recurrent_steps": len(out.ce_per_step),
                **({"contraction": out.contraction.item()} if out.contraction is not None else {}),
                **({"kv_consistency": out.kv_consistency.item()} if out.kv_consistency is not None else {}),
                **({"shared_kv": out.shared_kv.item()} if out.shared_kv is not None else {}),
                **{f"ce_step_{t + 1}": v for t, v in enumerate(out.ce_per_step.tolist())},
                **{f"exit_prob_step_{t + 1}": v for t, v in enumerate(out.exit_probs_mean.tolist())},
            }
            history.append(record)
            if log is not None:
                log(record)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history


@torch.no_grad()
def per_step_validation(
    model: LoopLM, sequences: torch.Tensor, num_steps: int | None = None, batch_size: int = 16
) -> torch.Tensor:
    """Mean cross-entropy of each recurrent step over held-out rows, as a [T] tensor."""
    totals, count = None, 0
    for start in range(0, sequences.shape[0], batch_size):
        inputs, labels = split_batch(sequences[start : start + batch_size])
        out = stage1_loss(model, inputs, labels, beta=0.0, num_steps=num_steps)
        weighted = out.ce_per_step * out.num_tokens
        totals = weighted if totals is None else totals + weighted
        count += out.num_tokens
    return totals / count
