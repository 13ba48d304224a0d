"""Decoding: cached decoding against full recomputation, real early exit, KV memory, sampling controls."""

import pytest
import torch

from looplm.model import (
    HiddenDiffExit,
    KVCache,
    LoopLM,
    LoopLMConfig,
    QExit,
    StaticExit,
    parse_exit_policy,
    select_exit_steps,
)

CONFIG = LoopLMConfig.preset("tiny", vocab_size=89, total_ut_steps=4, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = LoopLM(CONFIG)
    with torch.no_grad():
        m.model.early_exit_gate.weight.mul_(40)  # a gate that spreads exits over the steps
    return m.eval()


def _full_recompute(model, prompt, new_tokens):
    """Greedy continuation by running the whole sequence through all T steps for every new token."""
    sequence, tokens, logprobs = list(prompt), [], []
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[-1][0, -1]
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(torch.log_softmax(logits, -1)[token].item())
        sequence.append(token)
    return tokens, logprobs


def test_per_step_cached_decoding_equals_full_recomputation(model):
    prompts = [[5, 17, 33, 2], [8, 1, 40, 41, 42, 43, 9]]  # different lengths: left padding inside
    out = model.generate(prompts, max_new_tokens=10, kv_cache="per_step", exit_policy=QExit(1.0))
    for prompt, tokens, logprobs, exits in zip(prompts, out.tokens, out.logprobs, out.exit_steps, strict=True):
        expected_tokens, expected_logprobs = _full_recompute(model, prompt, 10)
        assert tokens == expected_tokens
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)
        assert exits == [4] * 10


def test_batched_generation_equals_one_prompt_at_a_time(model):
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11], [12]]
    policy = QExit(0.6)
    batched = model.generate(prompts, max_new_tokens=8, exit_policy=policy, kv_cache="per_step")
    for i, prompt in enumerate(prompts):
        alone = model.generate([prompt], max_new_tokens=8, exit_policy=policy, kv_cache="per_step")
        assert alone.tokens[0] == batched.tokens[i]
        assert alone.exit_steps[0] == batched.exit_steps[i]


def _count_layer_rows(model):
    counts = {"calls": 0, "rows": 0}

    def hook(module, args, output):
        counts["calls"] += 1
        counts["rows"] += args[0].shape[0]

    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    return counts, handles


@pytest.mark.parametrize("strategy", ["per_step", "last_step", "average"])
def test_q_zero_exits_at_step_one_and_skips_the_rest(model, strategy):
    prompt = [[1, 2, 3, 4]]
    counts, handles = _count_layer_rows(model)
    try:
        out = model.generate(prompt, max_new_tokens=6, exit_policy=QExit(0.0), kv_cache=strategy)
    finally:
        for h in handles:
            h.remove()
    assert out.exit_steps == [[1] * 6]
    layers, steps = CONFIG.num_hidden_layers, CONFIG.total_ut_steps
    # Prefill runs all T steps once; each of the 5 decoded tokens then runs the stack once, not T times.
    assert counts["calls"] == layers * steps + 5 * layers


def test_q_one_runs_all_steps(model):
    counts, handles = _count_layer_rows(model)
    try:
        out = model.generate([[1, 2, 3, 4]], max_new_tokens=6, exit_policy=QExit(1.0))
    finally:
        for h in handles:
            h.remove()
    assert out.exit_steps == [[4] * 6]
    assert counts["calls"] == CONFIG.num_hidden_layers * 4 * 6


def test_mixed_exits_compute_only_the_steps_each_token_needs(model):
    prompts = [[i, i + 1, i + 2] for i in range(1, 9)]
    counts, handles = _count_layer_rows(model)
    try:
        out = model.generate(prompts, max_new_tokens=5, exit_policy=QExit(0.5))
    finally:
        for h in handles:
            h.remove()
    decoded = [steps for seq in out.exit_steps for steps in seq[1:]]  # the first token comes from prefill
    assert len(set(decoded)) > 1, "the gate should spread exits for this test to mean something"
    prefill_rows = len(prompts) * CONFIG.total_ut_steps * CONFIG.num_hidden_layers
    # Each decoded token contributes one row per layer for each step it ran, and no more.
    assert counts["rows"] - prefill_rows == sum(decoded) * CONFIG.num_hidden_layers


def test_decode_exit_steps_match_the_policy_on_a_full_forward(model):
    """The step-by-step decision in decoding equals the vectorised one over all T steps."""
    prompt = [7, 8, 9, 10]
    policy = QExit(0.5)
    out = model.generate([prompt], max_new_tokens=6, exit_policy=policy, kv_cache="per_step")
    sequence = prompt + out.tokens[0]
    with torch.no_grad():
        full = model(torch.tensor([sequence]))
    expected = select_exit_steps(full.hidden_states, full.gate_logits, policy)[0]
    # Token j of the output is predicted at position len(prompt) - 1 + j. Deeper steps of earlier exited
    # tokens differ between the two (their deeper K/V is the exit step's in the cache), so compare the
    # first token (prefill, exact) and require every later decision to be a valid step.
    assert out.exit_steps[0][0] == int(expected[len(prompt) - 1])
    assert all(1 <= s <= 4 for s in out.exit_steps[0])


def test_per_step_cache_holds_exit_step_kv_in_deeper_slots(model):
    """Documented semantics: an early-exited token's deeper per_step slots hold its exit step's K/V."""
    captured = {}
    original_commit = KVCache.commit

    def spy(self, exit_steps, rows):
        original_commit(self, exit_steps, rows)
        captured["cache"] = self

    KVCache.commit = spy
    try:
        model.generate([[1, 2, 3]], max_new_tokens=3, exit_policy=StaticExit(2), kv_cache="per_step")
    finally:
        KVCache.commit = original_commit
    cache = captured["cache"]
    pos = cache.length - 1  # the last decoded position
    for layer in range(CONFIG.num_hidden_layers):
        step2 = cache.keys[cache._slot(2, layer)][:, :, pos]
        assert not torch.equal(step2, cache.keys[cache._slot(1, layer)][:, :, pos])
        for deeper in (3, 4):
            assert torch.equal(cache.keys[cache._slot(deeper, layer)][:, :, pos], step2)
            assert torch.equal(
                cache.values[cache._slot(deeper, layer)][:, :, pos], cache.values[cache._slot(2, layer)][:, :, pos]
            )


def test_shared_caches_hold_one_T_th_of_per_step_bytes(model):
    def cache_bytes(strategy):
        seen = {}
        original_prefill = KVCache.prefill

        def spy(self, kv):
            original_prefill(self, kv)
            seen["bytes"] = self.nbytes()

        KVCache.prefill = spy
        try:
            model.generate([[1, 2, 3, 4, 5]], max_new_tokens=4, kv_cache=strategy)
        finally:
            KVCache.prefill = original_prefill
        return seen["bytes"]

    per_step = cache_bytes("per_step")
    # per token: 2 (K and V) * kv_heads * head_dim * 4 bytes * layers * T
    per_token = 2 * CONFIG.num_key_value_heads * CONFIG.attention_head_dim * 4 * CONFIG.num_hidden_layers
    assert per_step == per_token * CONFIG.total_ut_steps * (5 + 4)
    for strategy in ("last_step", "average"):
        assert cache_bytes(strategy) * CONFIG.total_ut_steps == per_step


def test_shared_caches_prefill_contents(model):
    """last_step keeps step T's K/V of prompt tokens, average the mean over the T steps."""
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        kv = model(ids, return_kv=True).kv
    shapes = dict(
        num_layers=CONFIG.num_hidden_layers,
        num_steps=4,
        batch=1,
        kv_heads=CONFIG.num_key_value_heads,
        head_dim=CONFIG.attention_head_dim,
        capacity=8,
        dtype=torch.float32,
    )
    last, average = KVCache("last_step", **shapes), KVCache("average", **shapes)
    last.prefill(kv)
    average.prefill(kv)
    for layer in range(CONFIG.num_hidden_layers):
        assert torch.equal(last.past(1, layer, None)[0], kv[3][layer][0])
        assert torch.equal(last.past(3, layer, None)[1], kv[3][layer][1])  # same slot for every step
        mean_k = sum(kv[t][layer][0] for t in range(4)) / 4
        torch.testing.assert_close(average.past(2, layer, None)[0], mean_k)


@pytest.mark.parametrize("strategy", ["last_step", "average"])
def test_shared_caches_decode_sensibly(model, strategy):
    out = model.generate([[1, 2, 3, 4]], max_new_tokens=5, kv_cache=strategy)
    assert len(out.tokens[0]) == 5 and all(s == 4 for s in out.exit_steps[0])
    # With a single decoded token, no cached decoded position is read: all strategies agree on token 2.
    exact = model.generate([[1, 2, 3, 4]], max_new_tokens=2, kv_cache="per_step")
    assert out.tokens[0][0] == exact.tokens[0][0]


def test_hidden_difference_and_static_policies(model):
    out = model.generate([[1, 2, 3]], max_new_tokens=4, exit_policy=StaticExit(3))
    assert out.exit_steps == [[3] * 4]
    never = model.generate([[1, 2, 3]], max_new_tokens=4, exit_policy=HiddenDiffExit(0.0))
    assert never.exit_steps == [[4] * 4]
    always = model.generate([[1, 2, 3]], max_new_tokens=4, exit_policy=HiddenDiffExit(1e9))
    assert always.exit_steps == [[2] * 4]  # the rule needs h_{t-1}, so step 2 is the earliest


def test_sampling_is_seeded_and_top_k_one_is_greedy(model):
    prompt = [[1, 2, 3]]
    a = model.generate(prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    b = model.generate(prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    assert a.tokens == b.tokens
    greedy = model.generate(prompt, max_new_tokens=8)
    assert model.generate(prompt, max_new_tokens=8, temperature=1.0, top_k=1, seed=5).tokens == greedy.tokens
    draws = {tuple(model.generate(prompt, max_new_tokens=8, temperature=2.0, seed=s).tokens[0]) for s in range(5)}
    assert len(draws) > 1


def test_stop_tokens_and_length(model):
    greedy = model.generate([[1, 2, 3]], max_new_tokens=6)
    stop = greedy.tokens[0][2]
    out = model.generate([[1, 2, 3]], max_new_tokens=6, stop_token_ids=[stop])
    first = greedy.tokens[0].index(stop)
    assert out.tokens[0] == greedy.tokens[0][:first] and out.finish_reasons == ["stop"]
    assert greedy.finish_reasons == ["length"]
    # The context bounds generation.
    near_full = list(range(1, CONFIG.max_position_embeddings - 1))
    assert len(model.generate([near_full], max_new_tokens=10).tokens[0]) == 2


def test_bad_requests_are_errors(model):
    too_long = [list(range(CONFIG.max_position_embeddings + 1))]
    with pytest.raises(ValueError, match="longer than the context"):
        model.generate(too_long, max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1]], max_new_tokens=1, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="KV cache strategy"):
        model.generate([[1]], max_new_tokens=2, kv_cache="first_step")


def test_parse_exit_policy():
    assert parse_exit_policy("q:0.25") == QExit(0.25)
    assert parse_exit_policy("static:2") == StaticExit(2)
    assert parse_exit_policy("hdiff:0.5") == HiddenDiffExit(0.5)
    for bad in ("q:2", "static:0", "depth:3", "q:x"):
        with pytest.raises(ValueError, match="exit policy|threshold|step"):
            parse_exit_policy(bad)
