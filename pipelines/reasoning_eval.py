"""Exact match per recurrent step on the paper's synthetic reasoning tasks (ouro-spec.md §8.2-8.3).

- `multihop`: held-out 3-hop questions over a synthetic relation world ("Who is the instructor of the teacher
  of the mentor of A?\\nAnswer:" -> " B"), the same test split the curation step decontaminates against;
- `mano`: modular arithmetic over prefix expression trees with exactly L operators (the paper scores l = L).

An item is correct at step t when greedy decoding with T = t produces exactly the answer's tokens. That is the
same as every answer token being the step-t argmax under teacher forcing, which one forward pass of
max_steps gives for every t at once (the first t steps do not depend on how many follow), so the evaluation
costs one forward per batch rather than one generation per item and step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from looplm.model import LoopLM
from looplm.model.generation import left_pad
from looplm.pipelines import synthetic

TASKS = ("multihop", "mano")


@dataclass(frozen=True)
class ReasoningTasks:
    tasks: tuple[str, ...] = ()  # any of "multihop", "mano"; empty: none
    count: int = 200  # test items per task
    seed: int = 0  # the world / problem seed: use the training corpus's seed
    multihop_hops: int = 3
    mano_operators: int = 10  # L: the paper's difficulty levels are 10, 16, 24

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown reasoning task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        if self.count < 1:
            raise ValueError(f"count must be positive, got {self.count}")


def task_items(task: str, settings: ReasoningTasks) -> list[tuple[str, str]]:
    """(prompt, answer) pairs; the answer carries its leading space, as it follows the prompt in training text."""
    if task == "multihop":
        world = synthetic.multihop_world(seed=settings.seed)
        _, test = synthetic.multihop_split(
            world, hops=settings.multihop_hops, train_count=0, test_count=settings.count, seed=settings.seed
        )
        return [(qa.question, f" {qa.answer}") for qa in test]
    if task == "mano":
        rng = random.Random(settings.seed + 4242)
        problems = [synthetic.mano_problem(settings.mano_operators, rng) for _ in range(settings.count)]
        return [(p.text.rsplit(" ", 1)[0], f" {p.answer}") for p in problems]
    raise ValueError(f"unknown reasoning task {task!r}; known: {', '.join(TASKS)}")


@torch.no_grad()
def exact_match_by_step(
    model: LoopLM, tokenizer: Any, items: list[tuple[str, str]], max_steps: int, batch_size: int = 32
) -> list[float]:
    """Fraction of items whose greedy answer at T = t is exactly right, for t = 1..max_steps."""
    correct = torch.zeros(max_steps)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        prompts = [tokenizer.encode(prompt).ids for prompt, _ in batch]
        answers = [tokenizer.encode(answer).ids for _, answer in batch]
        if any(not a for a in answers):
            raise ValueError("an answer encodes to no tokens")
        # Teacher forcing: feed prompt + answer minus its last token; position p predicts token p + 1.
        sequences = [p + a[:-1] for p, a in zip(prompts, answers, strict=True)]
        ids, mask = left_pad(sequences, model.config.pad_token_id)
        out = model(ids, max_steps, attention_mask=mask, return_logits=False)
        width = ids.shape[1]
        for row, answer in enumerate(answers):
            first = width - len(answer)  # the position that predicts the answer's first token
            positions = torch.arange(first, width)
            target = torch.tensor(answer)
            for t, h in enumerate(out.hidden_states):
                predicted = model.lm_head(h[row, positions]).argmax(-1)
                correct[t] += bool(torch.equal(predicted, target))
    return (correct / len(items)).tolist()


def reasoning_rows(model: LoopLM, tokenizer: Any, settings: ReasoningTasks, max_steps: int) -> list[dict[str, Any]]:
    """Table rows {"kind": "reasoning", "task", "step", "exact_match"} for every task and step."""
    rows = []
    for task in settings.tasks:
        scores = exact_match_by_step(model, tokenizer, task_items(task, settings), max_steps)
        rows += [{"kind": "reasoning", "task": task, "step": t, "exact_match": s} for t, s in enumerate(scores, 1)]
    return rows
