"""The looplm model class for lm-evaluation-harness, run through lm-eval's own evaluator on bundled tasks."""

import pytest
import torch
import torch.nn.functional as F

from looplm.model import load_pretrained
from looplm.model.tokenizer import load_tokenizer
from looplm.pipelines.lm_eval_adapter import SMOKE_TASKS, TASK_DIR, LoopLMHarness, run_tasks


@pytest.fixture(scope="module")
def smoke(trained_tiny):
    return run_tasks(str(trained_tiny.stage2), ["looplm_smoke"], num_steps=4, log_samples=True, batch_size=8)


@torch.no_grad()
def _direct_score(model, tokens: list[int], continuation_length: int, num_steps: int) -> float:
    """The reference model's own log-probability of the last tokens: last step's logits, nothing shared with
    the adapter (no batching, no padding, no exit selection)."""
    ids = torch.tensor([tokens[:-1]])
    logits = model(ids, num_steps).logits[-1][0].float()
    log_probs = F.log_softmax(logits, dim=-1)
    targets = torch.tensor(tokens[-continuation_length:])
    return log_probs[len(tokens) - 1 - continuation_length :].gather(-1, targets[:, None]).sum().item()


def test_bundled_smoke_tasks_ship_with_the_module():
    assert {p.stem for p in TASK_DIR.glob("*.yaml")} == set(SMOKE_TASKS)
    assert all((TASK_DIR / f).is_file() for f in ("bios_city.jsonl", "bios_text.jsonl", "bios_birth_date.jsonl"))


@pytest.mark.slow  # trains the session's tiny model
def test_smoke_tasks_run_end_to_end_through_the_evaluator(smoke):
    results = smoke["results"]
    assert set(SMOKE_TASKS) <= set(results)
    assert 0.0 <= results["looplm_bios_city"]["acc,none"] <= 1.0
    assert results["looplm_bios_text"]["word_perplexity,none"] > 1.0
    assert 0.0 <= results["looplm_bios_birth_date"]["exact_match,none"] <= 1.0
    assert all(len(smoke["samples"][task]) == 20 for task in SMOKE_TASKS)


@pytest.mark.slow  # trains the session's tiny model
def test_multiple_choice_loglikelihoods_equal_the_reference_models_scoring(smoke, trained_tiny):
    model = load_pretrained(trained_tiny.stage2)
    tokenizer = load_tokenizer(trained_tiny.stage2)
    checked = 0
    for sample in smoke["samples"]["looplm_bios_city"][:10]:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            context_ids = tokenizer.encode(context).ids
            whole = tokenizer.encode(context + continuation).ids
            expected = _direct_score(model, whole, len(whole) - len(context_ids), num_steps=4)
            assert response[0][0] == pytest.approx(expected, abs=1e-4)
            checked += 1
    assert checked == 40


@pytest.mark.slow  # trains the session's tiny model
def test_rolling_loglikelihoods_equal_the_reference_models_scoring(smoke, trained_tiny):
    model = load_pretrained(trained_tiny.stage2)
    tokenizer = load_tokenizer(trained_tiny.stage2)
    for sample in smoke["samples"]["looplm_bios_text"][:5]:
        (text,) = sample["arguments"][0]
        tokens = [model.config.eos_token_id, *tokenizer.encode(text).ids]  # one window: EOT, then the text
        expected = _direct_score(model, tokens, len(tokens) - 1, num_steps=4)
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow  # trains the session's tiny model
def test_generate_until_is_greedy_decoding_cut_at_the_stop_sequence(smoke, trained_tiny):
    model = load_pretrained(trained_tiny.stage2)
    tokenizer = load_tokenizer(trained_tiny.stage2)
    for sample in smoke["samples"]["looplm_bios_birth_date"][:4]:
        context, options = sample["arguments"][0]
        out = model.generate(
            [tokenizer.encode(context).ids], max_new_tokens=options["max_gen_toks"], stop_token_ids=[0]
        )
        assert sample["resps"][0][0] == tokenizer.decode(out.tokens[0]).split(".")[0]


@pytest.mark.slow  # trains the session's tiny model
def test_recurrent_steps_and_exit_threshold_are_model_arguments(trained_tiny):
    model = load_pretrained(trained_tiny.stage2)
    tokenizer = load_tokenizer(trained_tiny.stage2)
    context, continuation = [tokenizer.encode("Mico Raelgar Velishu was born on").ids], [tokenizer.encode(" May").ids]

    def score(**kwargs):
        harness = LoopLMHarness(model=model, tokenizer=tokenizer, **kwargs)
        return harness.continuation_logprobs(context, continuation)[0][0]

    one_step, four_steps = score(num_steps=1), score(num_steps=4)
    assert one_step != four_steps
    assert score(num_steps=4, exit_threshold=0.0) == pytest.approx(one_step, abs=1e-6)  # q = 0: every token exits at 1
    assert score(num_steps=4, exit_threshold=1.0) == four_steps
    harness = LoopLMHarness.create_from_arg_string(f"pretrained={trained_tiny.stage2},num_steps=2,exit_threshold=0.5")
    assert (harness.num_steps, harness.exit_policy.threshold) == (2, 0.5)
