"""Exact match per recurrent step against an independent computation: greedy generation with T = t."""

import pytest
import torch

from looplm.model import LoopLM, LoopLMConfig, QExit
from looplm.model.tokenizer import train_byte_level_bpe
from looplm.pipelines import synthetic
from looplm.pipelines.reasoning_eval import ReasoningTasks, exact_match_by_step, reasoning_rows, task_items


@pytest.fixture(scope="module")
def tokenizer():
    world = synthetic.multihop_world(seed=0, per_layer=20, num_relations=4)
    texts = synthetic.multihop_facts(world) + [p.text for p in synthetic.mano_problems(200, max_operators=4)]
    return train_byte_level_bpe(texts, 400)


def test_items_are_the_held_out_questions_and_correct_answers():
    settings = ReasoningTasks(tasks=("multihop", "mano"), count=20, mano_operators=5)
    multihop = task_items("multihop", settings)
    world = synthetic.multihop_world(seed=0)
    _, test = synthetic.multihop_split(world, hops=3, train_count=0, test_count=20, seed=0)
    assert multihop == [(qa.question, f" {qa.answer}") for qa in test]
    for prompt, answer in task_items("mano", settings):
        expression = prompt.split("<ans>")[0].split(" ", 2)[2]
        assert prompt.startswith("<bos> <len_5> ") and prompt.endswith("<ans>")
        assert int(answer) == synthetic.evaluate_prefix(expression)
    with pytest.raises(ValueError, match="unknown reasoning task"):
        ReasoningTasks(tasks=("gsm8k",))


def test_exact_match_by_step_equals_greedy_generation(tokenizer):
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig.preset("tiny", vocab_size=400, total_ut_steps=3)).eval()
    items = task_items("mano", ReasoningTasks(count=12, mano_operators=3))
    # Make half the items right at T = 2 by construction: their answer becomes the model's own greedy output.
    for i in range(0, len(items), 2):
        prompt_ids = tokenizer.encode(items[i][0]).ids
        out = model.generate([prompt_ids], max_new_tokens=2, num_steps=2, exit_policy=QExit(1.0))
        items[i] = (items[i][0], tokenizer.decode(out.tokens[0]))
    items = [(p, a) for p, a in items if tokenizer.encode(a).ids]

    scores = exact_match_by_step(model, tokenizer, items, max_steps=3, batch_size=5)
    for t in (1, 2, 3):
        hits = 0
        for prompt, answer in items:
            answer_ids = tokenizer.encode(answer).ids
            out = model.generate(
                [tokenizer.encode(prompt).ids], max_new_tokens=len(answer_ids), num_steps=t, exit_policy=QExit(1.0)
            )
            hits += out.tokens[0] == answer_ids
        assert scores[t - 1] == pytest.approx(hits / len(items))
    assert scores[1] >= 0.5  # the constructed half is right at T = 2


def test_reasoning_rows_shape(tokenizer):
    model = LoopLM(LoopLMConfig.preset("tiny", vocab_size=400)).eval()
    rows = reasoning_rows(model, tokenizer, ReasoningTasks(tasks=("multihop", "mano"), count=4, mano_operators=2), 3)
    assert [(r["task"], r["step"]) for r in rows] == [(task, t) for task in ("multihop", "mano") for t in (1, 2, 3)]
    assert all(0.0 <= r["exact_match"] <= 1.0 for r in rows)
