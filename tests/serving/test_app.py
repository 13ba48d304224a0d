"""The Ray Serve app on 127.0.0.1, called with the official openai client (and raw HTTP where a client would
refuse to send the request). One Serve instance for the module: the `per_step` app at / via `deploy`, with
API keys, plus `last_step` and `average` apps at /last_step and /average."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch

from looplm.model import LoopLM, QExit
from looplm.model.tokenizer import CHAT_END, load_tokenizer
from looplm.serving import EngineConfig, ServeConfig, deploy, run_apps, shutdown, wait_ready
from looplm.serving.openai_api import render_chat

pytestmark = pytest.mark.slow

KEY = "sk-looplm-test"
LIMIT = 240  # max_tokens_limit of the apps (context 256)


@dataclass(frozen=True)
class Served:
    base_url: str  # the per_step app's OpenAI base URL
    roots: dict[str, str]  # KV strategy -> root URL
    checkpoint: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    from ray import serve

    from looplm.infra.ray_cluster import ray_session

    engine = EngineConfig(max_batch_size=4, max_queue=4, max_tokens_limit=LIMIT, block_size=8, kv_cache_tokens=2048)
    config = ServeConfig(engine=engine, num_cpus=0, num_threads=1, api_keys=(KEY,))
    port = _free_port()
    with ray_session(num_cpus=2):
        try:
            # The shared-cache apps start first without waiting, so all three replicas boot together.
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            shared = [
                (str(tiny_checkpoint), f"looplm-{s}", f"/{s}", _with_strategy(config, s, keys=()))
                for s in ("last_step", "average")
            ]
            roots = dict(zip(("last_step", "average"), run_apps(shared, wait=False), strict=True))
            base_url = deploy(str(tiny_checkpoint), port=port, config=config)
            for root in roots.values():
                wait_ready(root)
            roots["per_step"] = base_url.removesuffix("/v1")
            yield Served(base_url, roots, tiny_checkpoint)
        finally:
            shutdown()


def _with_strategy(config: ServeConfig, strategy: str, keys=()) -> ServeConfig:
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, kv_cache=strategy), api_keys=keys)


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(served) -> LoopLM:
    return LoopLM.from_pretrained(served.checkpoint)


@pytest.fixture(scope="module")
def tokenizer(served):
    return load_tokenizer(served.checkpoint)


GREEDY = {"temperature": 0.0}
EARLY = {"exit_threshold": 0.5, "ignore_eos": True}


def test_health_models_and_api_keys(served, client):
    root = served.roots["per_step"]
    assert httpx.get(root + "/health").status_code == 200  # no key needed
    assert httpx.get(root + "/health/ready").status_code == 200
    denied = httpx.get(served.base_url + "/models")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(served.base_url + "/completions", headers={"Authorization": "Bearer nope"}, json={})
    assert wrong.status_code == 401
    assert [m.id for m in client.models.list().data] == ["looplm"]


@pytest.mark.parametrize("strategy", ["per_step", "last_step", "average"])
def test_greedy_completion_equals_reference_generate(served, reference, tokenizer, strategy):
    client = openai.OpenAI(base_url=served.roots[strategy] + "/v1", api_key=KEY, max_retries=0)
    model = "looplm" if strategy == "per_step" else f"looplm-{strategy}"
    prompt = "They were born in Chicago. They"
    result = client.completions.create(model=model, prompt=prompt, max_tokens=24, **GREEDY, extra_body=EARLY)
    ref = reference.generate(
        [tokenizer.encode(prompt).ids], max_new_tokens=24, kv_cache=strategy, exit_policy=QExit(0.5)
    )
    choice = result.choices[0]
    assert choice.text == tokenizer.decode(ref.tokens[0], skip_special_tokens=False)
    assert choice.exit_steps == ref.exit_steps[0]
    assert result.usage.completion_tokens == 24 and choice.finish_reason == "length"
    assert result.usage.average_recurrent_steps == pytest.approx(sum(ref.exit_steps[0]) / 24, abs=1e-3)


def test_chat_uses_chatml_and_stops_at_im_end(client, reference, tokenizer):
    messages = [{"role": "user", "content": "Where were they born?"}]
    result = client.chat.completions.create(model="looplm", messages=messages, max_tokens=20, **GREEDY)
    prompt = "<|im_start|>user\nWhere were they born?<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(_messages(messages), None) == prompt
    stops = [tokenizer.token_to_id(CHAT_END), reference.config.eos_token_id]
    ref = reference.generate([tokenizer.encode(prompt).ids], max_new_tokens=20, stop_token_ids=stops)
    assert result.choices[0].message.content == tokenizer.decode(ref.tokens[0], skip_special_tokens=False)
    assert result.choices[0].finish_reason == ref.finish_reasons[0]


def _messages(raw):
    from looplm.serving.openai_api import ChatMessage

    return [ChatMessage(**m) for m in raw]


def test_streaming_matches_the_full_response_and_reports_usage(client):
    kwargs = dict(model="looplm", prompt="They majored in", max_tokens=16, **GREEDY, extra_body=EARLY)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    steps = [s for c in chunks if c.choices for s in c.choices[0].exit_steps]
    assert text == full.choices[0].text and steps == full.choices[0].exit_steps
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.average_recurrent_steps == pytest.approx(full.usage.average_recurrent_steps)
    chat = client.chat.completions.create(
        model="looplm", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True, **GREEDY
    )
    pieces = list(chat)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_sequences_end_the_text_before_them(client):
    messages = [{"role": "user", "content": "Tell me about them."}]
    kwargs = dict(model="looplm", messages=messages, max_tokens=30, **GREEDY)
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(text) > 10 and "\ufffd" not in text[:10], f"need readable text to cut: {text!r}"
    stop = text[6:9]
    result = client.chat.completions.create(stop=[stop], **kwargs)
    assert result.choices[0].message.content == text[: text.index(stop)]
    assert result.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible_and_equals_reference(client, reference, tokenizer):
    kwargs = dict(model="looplm", prompt="They worked for", max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=11, **kwargs, extra_body={"ignore_eos": True})
    b = client.completions.create(seed=11, **kwargs, extra_body={"ignore_eos": True})
    c = client.completions.create(seed=12, **kwargs, extra_body={"ignore_eos": True})
    assert a.choices[0].text == b.choices[0].text != c.choices[0].text
    ids = [tokenizer.encode("They worked for").ids]
    ref = reference.generate(ids, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    assert a.choices[0].text == tokenizer.decode(ref.tokens[0], skip_special_tokens=False)


def test_concurrent_requests_get_the_sequential_answers(client):
    prompts = ["They were born in", "They studied", "Their birthday is", "They live in", "They worked", "The"]
    thresholds = [0.3, 0.5, 1.0, 0.7, 0.4, 0.6]

    def ask(i):
        extra = {"exit_threshold": thresholds[i], "ignore_eos": True}
        r = client.completions.create(model="looplm", prompt=prompts[i], max_tokens=12, **GREEDY, extra_body=extra)
        return r.choices[0].text, r.choices[0].exit_steps

    sequential = [ask(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(ask, range(len(prompts))))
    assert concurrent == sequential


def _post(served, path, body: bytes | dict, root=None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post((root or served.base_url) + path, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        (b'{"model": "looplm", "prompt": "hi"', 400, None, "malformed JSON"),
        ({"model": "looplm", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
        ({"model": "looplm", "prompt": "hi", "temperature": [1]}, 400, "temperature", "temperature"),
        ({"model": "looplm", "prompt": list(range(300)), "max_tokens": 4}, 400, "prompt", "context"),
        ({"model": "looplm", "prompt": "hi", "max_tokens": LIMIT + 1}, 400, "max_tokens", "limit"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "gpt-4"),
        ({"model": "looplm", "prompt": "hi", "loop_steps": 9}, 400, "loop_steps", "loop_steps"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx_and_the_server_stays_up(served, client, body, status, param, words):
    response = _post(served, "/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]
    assert client.completions.create(model="looplm", prompt="hi", max_tokens=2).choices[0].text is not None


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="limit"):
        client.completions.create(model="looplm", prompt="hi", max_tokens=LIMIT + 1)


def _stats(served) -> dict:
    return httpx.get(served.base_url + "/engine/stats", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_overload_gets_429_with_retry_after(served, client):
    body = {"model": "looplm", "prompt": "They", "max_tokens": 200, "ignore_eos": True}

    def ask(_):
        return _post(served, "/completions", body)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(ask, range(16)))
    codes = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert refused and set(codes) <= {200, 429}, codes
    assert all(r.headers.get("retry-after") for r in refused)
    assert refused[0].json()["error"]["type"] == "rate_limit_error"
    assert codes.count(200) >= 4  # the batch (4) and the queue (4) were served
    assert _stats(served)["kv_blocks_used"] == 0


def test_dropped_stream_releases_its_kv_blocks(served):
    before = _stats(served)
    body = {"model": "looplm", "prompt": "They", "max_tokens": LIMIT, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", served.base_url + "/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        next(response.iter_lines())  # the first token arrived: the request holds blocks now
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = _stats(served)
        if stats["aborted_requests"] > before["aborted_requests"] and stats["kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert stats["aborted_requests"] == before["aborted_requests"] + 1, "the dropped stream was not aborted"
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    assert stats["generated_tokens"] - before["generated_tokens"] < LIMIT  # it stopped before max_tokens


def test_early_exit_through_the_api_cuts_loop_steps(client):
    kwargs = dict(model="looplm", prompt="They were born in", max_tokens=16, **GREEDY)
    full = client.completions.create(**kwargs, extra_body={"exit_threshold": 1.0, "ignore_eos": True})
    early = client.completions.create(**kwargs, extra_body={"exit_threshold": 0.2, "ignore_eos": True})
    assert full.usage.average_recurrent_steps == 4.0
    assert early.usage.average_recurrent_steps < 3.0
    assert torch.tensor(early.choices[0].exit_steps).min() == 1


class _DevTools:
    """The Chrome DevTools protocol over one page's websocket: just enough to drive the page."""

    def __init__(self, socket):
        self.socket, self.next_id = socket, 0

    def __call__(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")


def test_playground_streams_tokens_shaded_by_exit_step_in_chromium(served, client, tmp_path):
    import shutil
    import subprocess

    from websockets.sync.client import connect

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-address=127.0.0.1"]
    args += ["--remote-debugging-port=0", f"--user-data-dir={tmp_path}", "about:blank"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if "DevTools listening on ws://" in line:
                port = int(line.split("ws://127.0.0.1:")[1].split("/")[0])
                break
        else:
            pytest.fail("chromium did not open its DevTools port")
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
            devtools = _DevTools(socket)
            devtools("Page.navigate", url=served.roots["per_step"] + "/")
            _until(
                lambda: (
                    devtools.evaluate("document.readyState") == "complete"
                    and devtools.evaluate("!!document.getElementById('run')")
                )
            )
            devtools.evaluate(
                f"""(() => {{
                  document.getElementById('api-key').value = {json.dumps(KEY)};
                  document.getElementById('prompt').value = 'They majored in';
                  document.getElementById('threshold').value = '0.5';
                  document.getElementById('max-tokens').value = '24';
                  document.getElementById('run').click();
                  return true; }})()"""
            )
            _until(lambda: "recurrent steps" in devtools.evaluate("document.getElementById('status').textContent"))
            spans = devtools.evaluate(
                "[...document.querySelectorAll('#output .tok')]"
                ".map(s => [Number(s.dataset.step), s.style.backgroundColor, s.textContent])"
            )
    finally:
        process.terminate()
        process.wait(timeout=10)
    expected = client.completions.create(
        model="looplm", prompt="They majored in", max_tokens=24, temperature=0.0, extra_body={"exit_threshold": 0.5}
    ).choices[0]
    assert spans, "no tokens arrived in the page"
    assert "".join(text for _, _, text in spans) == expected.text
    assert {step for step, _, _ in spans} <= set(expected.exit_steps)
    assert len({step for step, _, _ in spans}) > 1 and len({color for _, color, _ in spans}) > 1  # shaded by step
    assert all(color.startswith("rgb") for _, color, _ in spans)


def _until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("the page did not get there in time")


def test_prometheus_metrics_on_rays_metrics_endpoint(client):
    import ray

    client.completions.create(model="looplm", prompt="They", max_tokens=4, temperature=0.0)
    port = ray._private.worker.global_worker.node.metrics_export_port
    names = ["requests", "generated_tokens", "queue_depth", "time_to_first_token_s", "time_per_output_token_s"]
    names = [f"ray_looplm_{n}" for n in names + ["loop_steps_per_token", "kv_blocks_used"]]
    missing = names
    deadline = time.monotonic() + 30
    while missing and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [n for n in names if n not in text]
        time.sleep(0.5)
    assert not missing, f"not exported: {missing}"
    assert "ray_looplm_requests_total{" in text and 'route="completions"' in text
