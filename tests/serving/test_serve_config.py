"""The shipped Serve config file builds the app, and bad serving configs are errors that name the key."""

from pathlib import Path

import pytest
import yaml

from looplm.serving import ServeConfig
from looplm.serving.app import build

REPO = Path(__file__).resolve().parents[2]


def test_serve_config_file_builds_the_app(tiny_checkpoint):
    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    (application,) = config["applications"]
    assert application["import_path"] == "looplm.serving.app:build"
    args = {**application["args"], "model": str(tiny_checkpoint)}
    app = build(args)
    parsed = ServeConfig.from_dict({k: v for k, v in args.items() if k not in ("model", "name")})
    assert parsed.engine.kv_cache == "per_step" and parsed.api_keys == ()
    assert type(app).__name__ == "Application"


def test_bad_serving_configs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig.from_dict({"max_batch": 3})
    with pytest.raises(ValueError, match="kv_caches"):
        ServeConfig.from_dict({"engine": {"kv_caches": "per_step"}})
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        ServeConfig.from_dict({"engine": {"kv_cache": "first_step"}})
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        build({"model": str(tmp_path)})
    with pytest.raises(ValueError, match="args.model"):
        build({})


def test_chat_template_comes_from_the_tokenizer_config(tmp_path):
    import json

    from looplm.serving.openai_api import ChatMessage, render_chat
    from looplm.serving.server import _chat_template

    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert _chat_template(tmp_path) is None  # no tokenizer_config.json: ChatML
    assert render_chat(messages, None) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert render_chat(messages, _chat_template(tmp_path)) == "[system] Be brief.\n[user] Hi\n[assistant]"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        _chat_template(tmp_path)
