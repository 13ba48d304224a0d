"""Per-token exit policies: after step t, does a token stop here (ouro-spec.md §5.1)?

- StaticExit(k): always stop at step k (or at T if k > T).
- QExit(q): stop at the first t whose cumulative exit probability CDF(t) = 1 - prod_{j<=t}(1 - lambda_j)
  reaches q. CDF(T) = 1 by definition, so q = 1 runs all T steps and q -> 0 stops at step 1. (q = 1 runs
  all T steps even where a saturated gate rounds lambda_t to exactly 1 and CDF(t < T) to 1 in floating point.)
- HiddenDiffExit(eps): stop at the first t >= 2 with ||h_t - h_{t-1}||_2 < eps.

Every policy stops at the last step. The same `exits` decision serves decoding (where the steps after the exit
are never computed) and evaluation over a full forward (`select_exit_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StaticExit:
    step: int

    def __post_init__(self) -> None:
        if self.step < 1:
            raise ValueError(f"static exit step must be at least 1, got {self.step}")

    def exits(self, t: int, cdf: torch.Tensor, h: torch.Tensor, h_prev: torch.Tensor | None) -> torch.Tensor:
        return torch.full_like(cdf, t >= self.step, dtype=torch.bool)


@dataclass(frozen=True)
class QExit:
    threshold: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"Q-exit threshold must lie in [0, 1], got {self.threshold}")

    def exits(self, t: int, cdf: torch.Tensor, h: torch.Tensor, h_prev: torch.Tensor | None) -> torch.Tensor:
        if self.threshold >= 1.0:
            return torch.zeros_like(cdf, dtype=torch.bool)  # the caller stops every token at step T
        return cdf >= self.threshold


@dataclass(frozen=True)
class HiddenDiffExit:
    epsilon: float

    def __post_init__(self) -> None:
        if self.epsilon < 0:
            raise ValueError(f"hidden-state difference threshold must be >= 0, got {self.epsilon}")

    def exits(self, t: int, cdf: torch.Tensor, h: torch.Tensor, h_prev: torch.Tensor | None) -> torch.Tensor:
        if h_prev is None:
            return torch.zeros_like(cdf, dtype=torch.bool)
        return torch.linalg.vector_norm((h - h_prev).float(), dim=-1) < self.epsilon


ExitPolicy = StaticExit | QExit | HiddenDiffExit


def parse_exit_policy(spec: str) -> ExitPolicy:
    """'static:2', 'q:0.5' or 'hdiff:0.05' -> a policy (for configs, the CLI and requests)."""
    kind, _, value = spec.partition(":")
    try:
        if kind == "static":
            return StaticExit(int(value))
        if kind == "q":
            return QExit(float(value))
        if kind == "hdiff":
            return HiddenDiffExit(float(value))
    except ValueError as err:
        raise ValueError(f"bad exit policy {spec!r}: {err}") from None
    raise ValueError(f"bad exit policy {spec!r}: expected 'static:K', 'q:Q' or 'hdiff:EPS'")


def step_cdf(survival_before: torch.Tensor, gate_logit: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CDF(t) and the survival S_t from S_{t-1} and step t's gate logit."""
    survival = survival_before * (1.0 - torch.sigmoid(gate_logit.float()))
    cdf = torch.ones_like(survival) if last else 1.0 - survival
    return cdf, survival


def select_exit_steps(hidden_states: list[torch.Tensor], gate_logits: torch.Tensor, policy: ExitPolicy) -> torch.Tensor:
    """The 1-indexed exit step of every position of a full forward pass (all T steps computed)."""
    steps = len(hidden_states)
    exit_step = torch.full(gate_logits.shape[:-1], steps, dtype=torch.long, device=gate_logits.device)
    undecided = torch.ones_like(exit_step, dtype=torch.bool)
    survival = torch.ones(gate_logits.shape[:-1], device=gate_logits.device)
    for t in range(1, steps + 1):
        cdf, survival = step_cdf(survival, gate_logits[..., t - 1], last=t == steps)
        h_prev = hidden_states[t - 2] if t > 1 else None
        stop = undecided & (policy.exits(t, cdf, hidden_states[t - 1], h_prev) | (t == steps))
        exit_step[stop] = t
        undecided &= ~stop
    return exit_step
