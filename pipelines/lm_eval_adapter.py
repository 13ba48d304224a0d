"""The reference LoopLM as an lm-evaluation-harness model ("looplm"), with recurrent steps and exit threshold as
model arguments, plus looplm's bundled smoke tasks.

    from looplm.pipelines.lm_eval_adapter import run_tasks
    results = run_tasks("models:/looplm-demo@demo", ["looplm_smoke"], num_steps=4, exit_threshold=1.0)

or, from a shell, any lm-eval task (its data must already be in the Hugging Face cache, or the task must read
local files: nothing is downloaded when HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1):

    python -m looplm.pipelines.lm_eval_adapter run --model looplm \
        --model_args pretrained=models:/looplm-tiny/1,num_steps=4,exit_threshold=0.8 --tasks looplm_smoke

(`run` is lm-eval's own command; this module registers the model and adds the bundled task folder to
--include_path.) To run a standard task such as arc_easy or hellaswag offline, fetch its dataset once on a
machine with network access (`datasets.load_dataset(...)` fills ~/.cache/huggingface), copy that cache here and
run with HF_DATASETS_OFFLINE=1; or write a task YAML beside your data files in the style of lm_eval_tasks/.

Scoring: a request's tokens run through the loop for `num_steps` recurrent steps; each position is read out at
its Q-exit step (`select_exit_steps` with QExit(exit_threshold); q = 1 reads every position at the last step),
so the scores are those the model gives with that exit rule. generate_until decodes with real early exit
(`looplm.model.generate`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from looplm.infra.registry import resolve_model_dir
from looplm.model import QExit, load_pretrained, select_exit_steps
from looplm.model.tokenizer import load_tokenizer

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
SMOKE_TASKS = ("looplm_bios_city", "looplm_bios_text", "looplm_bios_birth_date")


def _none_if_empty(value: Any) -> Any:
    return None if value in (None, "", "None", "none") else value


@register_model("looplm")
class LoopLMHarness(TemplateLM):
    """lm-eval's model interface over the reference LoopLM.

    Model arguments: pretrained (a checkpoint folder or models:/NAME/VERSION, models:/NAME@ALIAS), num_steps
    (recurrent steps T; default the model's own), exit_threshold (Q-exit q in [0, 1]; default 1.0),
    batch_size, max_length (default the model's context), dtype (float32, bfloat16).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        num_steps: int | str | None = None,
        exit_threshold: float | str = 1.0,
        batch_size: int | str = 16,
        max_length: int | str | None = None,
        dtype: str = "float32",
        model: Any = None,
        tokenizer: Any = None,
        **unused: Any,
    ):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("looplm lm-eval model needs pretrained=<checkpoint folder or models:/ URI>")
            folder = resolve_model_dir(pretrained)
            model = load_pretrained(folder, dtype=getattr(torch, dtype))
            tokenizer = load_tokenizer(folder)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with an in-memory model")
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        num_steps = _none_if_empty(num_steps)
        self.num_steps = int(num_steps) if num_steps is not None else config.total_ut_steps
        self.exit_policy = QExit(float(exit_threshold))
        self.batch_size = int(batch_size)
        max_length = _none_if_empty(max_length)
        self.max_length = int(max_length) if max_length is not None else config.max_position_embeddings
        if self.num_steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"bad looplm model arguments: num_steps={num_steps}, batch_size={batch_size}")

    # ------------------------------------------------------------ tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.model.config.eos_token_id

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def tokenizer_name(self) -> str:
        return "looplm-bpe"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string).ids

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # ------------------------------------------------------------ scoring

    @torch.no_grad()
    def continuation_logprobs(self, contexts: Sequence[list[int]], continuations: Sequence[list[int]]) -> list[tuple]:
        """Per pair: (sum of the continuation's token log-probabilities, whether greedy decoding gives it).

        Pairs are right-padded into one batch; with causal attention the padding never reaches a real position.
        """
        rows, targets = [], []
        for context, continuation in zip(contexts, continuations, strict=True):
            if not continuation:
                raise ValueError("an lm-eval continuation encoded to no tokens")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            span = min(len(continuation), len(whole) - 1)  # a continuation longer than the context is cut
            rows.append(whole[:-1])
            targets.append(whole[-span:])
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.model.config.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        log_probs = self.exit_log_probs(ids.to(self.device))
        results = []
        for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
            target = torch.tensor(target, device=log_probs.device)
            picked = log_probs[i, len(row) - len(target) : len(row)]  # [span, vocab]: position j predicts j + 1
            score = picked.gather(-1, target[:, None]).sum().item()
            results.append((score, bool((picked.argmax(-1) == target).all())))
        return results

    def exit_log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        """Log-softmax of each position's logits at its exit step: [batch, seq, vocab], float32."""
        out = self.model(ids, self.num_steps, return_logits=False)
        exit_steps = select_exit_steps(out.hidden_states, out.gate_logits, self.exit_policy)  # [batch, seq]
        stacked = torch.stack(out.hidden_states, dim=0)  # [T, batch, seq, d]
        chosen = stacked.gather(0, (exit_steps - 1)[None, ..., None].expand(1, *stacked.shape[1:])).squeeze(0)
        return F.log_softmax(self.model.lm_head(chosen).float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            scored = self.continuation_logprobs([requests[i][1] for i in chunk], [requests[i][2] for i in chunk])
            for index, result in zip(chunk, scored, strict=True):
                results[index] = result
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], result)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scores = []
        for (text,) in (request.args for request in requests):
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = 0.0
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start : start + self.batch_size]
                total += sum(s for s, _ in self.continuation_logprobs([w[0] for w in batch], [w[1] for w in batch]))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            scores.append(total)
        return scores

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for key, indices in groups.items():
            options = json.loads(key)
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.get("max_gen_toks", 256))
            temperature = float(options.get("temperature", 0.0)) if options.get("do_sample") else 0.0
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                budget = max(1, self.max_length - max_new)
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-budget:] for i in chunk]
                output = self.model.generate(
                    prompts,
                    max_new_tokens=max_new,
                    num_steps=self.num_steps,
                    exit_policy=self.exit_policy,
                    temperature=temperature,
                    seed=0,
                    stop_token_ids=[self.eot_token_id],
                )
                for index, tokens in zip(chunk, output.tokens, strict=True):
                    text = self.tok_decode(tokens)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results  # type: ignore[return-value]


def task_manager(extra_paths: Sequence[str | Path] = ()) -> Any:
    """lm-eval's TaskManager with looplm's bundled tasks (and any extra task folders) included."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASK_DIR), *map(str, extra_paths)])


def run_tasks(
    model: str | Any,
    tasks: Sequence[str],
    *,
    num_steps: int | None = None,
    exit_threshold: float = 1.0,
    tokenizer: Any = None,
    limit: int | None = None,
    batch_size: int = 16,
    task_paths: Sequence[str | Path] = (),
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval tasks through lm-eval's own evaluator on a checkpoint, a models:/ URI or an in-memory LoopLM.

    Returns lm-eval's results dict ("results" holds task -> metric -> value).
    """
    from lm_eval import simple_evaluate

    if isinstance(model, str | Path):
        lm = LoopLMHarness(str(model), num_steps=num_steps, exit_threshold=exit_threshold, batch_size=batch_size)
    else:
        lm = LoopLMHarness(
            model=model, tokenizer=tokenizer, num_steps=num_steps, exit_threshold=exit_threshold, batch_size=batch_size
        )
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=task_manager(task_paths),
        limit=limit,
        log_samples=log_samples,
        bootstrap_iters=0,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the "looplm" model registered and the bundled tasks on --include_path."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run" and "--include_path" not in argv:
        argv += ["--include_path", str(TASK_DIR)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
