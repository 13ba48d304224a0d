"""The embedded demo: raw generated text to a looped model that exits early, on a laptop-sized machine.

Until the Ray DAG lands this runs the same stages in one process, each for real:
  1. generate a bioS corpus (synthetic biographies) and hold out a validation split;
  2. train a byte-level BPE tokenizer on it and pack the token stream into sequences;
  3. pretrain the `tiny` LoopLM with the Stage I objective (LM and exit gate together);
  4. train the exit gate alone with the Stage II objective (LM frozen);
  5. save the model in the Ouro HF layout, load it back and check the logits are identical;
  6. report validation loss per recurrent step, then generate with Q-exit at several thresholds and
     print how many steps the tokens actually ran;
  7. track it in MLflow: a run for the demo with nested train, evaluate and register runs (per-step metrics,
     the Stage I and Stage II gates' compute-quality curves, plots), and the model registered as a version of
     `looplm-demo`. The server is started on runs/mlflow (or MLFLOW_TRACKING_URI is used); `looplm mlflow`
     serves it afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from looplm.infra.mlflow_server import ensure_tracking_server
from looplm.infra.tracking import pipeline_run, step_run
from looplm.model import LoopLM, LoopLMConfig, QExit
from looplm.model.tokenizer import END_OF_DOCUMENT, PAD, special_token_id, train_byte_level_bpe
from looplm.pipelines import evaluate, synthetic
from looplm.pipelines.reference_train import TrainSettings, pack_documents, per_step_validation, train
from looplm.pipelines.register import register_model


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output: str = "runs/demo"
    people: int = 400
    exposures: int = 6
    seq_len: int = 128
    stage1: TrainSettings = TrainSettings(steps=300, batch_size=16, lr=3e-3, warmup_steps=30, beta=0.05)
    stage2: TrainSettings = TrainSettings(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, stage="stage2")
    thresholds: tuple[float, ...] = (0.2, 0.5, 0.8, 1.0)
    seed: int = 0
    track: bool = True  # step 7: MLflow runs and the registered model
    registered_name: str = "looplm-demo"


def _print_row(record: dict, steps: int) -> None:
    ce = " ".join(f"{record[f'ce_step_{t}']:.3f}" for t in range(1, steps + 1))
    p = " ".join(f"{record[f'exit_prob_step_{t}']:.2f}" for t in range(1, steps + 1))
    print(f"  step {record['step']:4d}  loss {record['loss']:.4f}  CE/step [{ce}]  p(exit) [{p}]", flush=True)


def run(config: DemoConfig = DemoConfig()) -> dict:
    torch.manual_seed(config.seed)
    out_dir = Path(config.output)
    started = time.perf_counter()

    print(f"[1/7] generating {config.people} synthetic people x {config.exposures} exposures (bioS)")
    texts = synthetic.biographies(config.people, seed=config.seed, exposures=config.exposures)
    prompts_people = synthetic.people(config.people, seed=config.seed)[:4]

    model_config = LoopLMConfig.preset("tiny")
    print(f"[2/7] training a byte-level BPE tokenizer ({model_config.vocab_size} entries)")
    tokenizer = train_byte_level_bpe(texts, model_config.vocab_size)
    eod = special_token_id(tokenizer, END_OF_DOCUMENT)
    model_config = dataclasses.replace(
        model_config, bos_token_id=eod, eos_token_id=eod, pad_token_id=special_token_id(tokenizer, PAD)
    )
    rows = pack_documents((e.ids for e in tokenizer.encode_batch(texts)), eod, config.seq_len)
    shuffled = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(config.seed))]
    n_valid = max(4, rows.shape[0] // 20)
    valid, train_rows = shuffled[:n_valid], shuffled[n_valid:]
    print(f"      {rows.numel():,} tokens in {rows.shape[0]} sequences of {config.seq_len}; {n_valid} held out")

    model = LoopLM(model_config)
    steps = model_config.total_ut_steps
    print(
        f"[3/7] Stage I: tiny LoopLM, {model_config.num_parameters():,} parameters, "
        f"{model_config.num_hidden_layers} layers x T={steps}"
    )
    before = per_step_validation(model, valid)
    history1 = train(model, train_rows, config.stage1, log=lambda r: _print_row(r, steps))
    after = per_step_validation(model, valid)

    stage1_checkpoint = model.save_pretrained(out_dir / "stage1", tokenizer=tokenizer, overwrite=True)
    print("[4/7] Stage II: exit gate only, LM frozen")
    lm_before = {n: p.clone() for n, p in model.named_parameters() if "early_exit_gate" not in n}
    history2 = train(model, train_rows, config.stage2, log=lambda r: _print_row(r, steps))
    unchanged = all(torch.equal(p, lm_before[n]) for n, p in model.named_parameters() if n in lm_before)
    print(f"      LM weights unchanged by Stage II: {unchanged}")

    checkpoint = out_dir / "checkpoint"
    print(f"[5/7] saving the Ouro HF layout to {checkpoint} and loading it back")
    model.save_pretrained(checkpoint, tokenizer=tokenizer, overwrite=True)
    reloaded = LoopLM.from_pretrained(checkpoint)
    probe = valid[:2, :-1]
    same = all(torch.equal(a, b) for a, b in zip(model(probe).logits, reloaded(probe).logits, strict=True))
    print(f"      reloaded logits bit-identical: {same}")

    print("[6/7] validation cross-entropy per recurrent step (before -> after training)")
    for t in range(steps):
        print(f"      step {t + 1}: {before[t]:.3f} -> {after[t]:.3f}")
    prompts = [tokenizer.encode(f"{p.name} was born on").ids for p in prompts_people]
    print("      greedy generation with Q-exit; steps actually run per generated token:")
    exit_stats = {}
    for q in config.thresholds:
        gen = reloaded.generate(prompts, max_new_tokens=24, exit_policy=QExit(q), stop_token_ids=[eod])
        exits = torch.tensor([s for seq in gen.exit_steps for s in seq], dtype=torch.float)
        histogram = torch.bincount(exits.long(), minlength=steps + 1)[1:].tolist()
        exit_stats[q] = {"mean_steps": exits.mean().item(), "histogram": histogram}
        print(f"      q={q:.1f}: mean steps {exits.mean():.2f} of {steps}, exits per step {histogram}")
    sample = reloaded.generate(prompts[:1], max_new_tokens=40, exit_policy=QExit(0.5), stop_token_ids=[eod])
    print(f"      sample (q=0.5): {tokenizer.decode(prompts[0])!r} -> {tokenizer.decode(sample.tokens[0])!r}")
    print(f"      exit steps:     {sample.exit_steps[0]}")
    registered = track(config, checkpoint, stage1_checkpoint, history1) if config.track else None
    print(f"done in {time.perf_counter() - started:.0f} s; checkpoint at {checkpoint}")
    return {
        "registered": registered,
        "stage1": history1,
        "stage2": history2,
        "valid_before": before.tolist(),
        "valid_after": after.tolist(),
        "roundtrip_exact": same,
        "lm_unchanged_by_stage2": unchanged,
        "exit_stats": exit_stats,
    }


def track(config: DemoConfig, checkpoint: Path, stage1_checkpoint: Path, history: list[dict]) -> str:
    """Step 7: one MLflow run for the demo, nested runs per step, the model registered. Returns its URI."""
    print("[7/7] tracking in MLflow: evaluation by recurrent step and exit threshold, and the registered model")
    tracking_uri, server = ensure_tracking_server()
    eval_config = evaluate.EvalConfig(
        model=str(checkpoint),
        stage1_model=str(stage1_checkpoint),
        max_steps=6,
        data=evaluate.EvalData(people=100, seed=config.seed + 1000, seq_len=config.seq_len, max_sequences=32),
        run_name="demo",
    )
    try:
        with pipeline_run("demo", config=config, tracking_uri=tracking_uri) as demo_run:
            with step_run(demo_run, "train", config=config.stage1) as train_run:
                for record in history:
                    train_run.log_metrics({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            with step_run(demo_run, "evaluate", config=eval_config) as eval_run:
                table = evaluate.run(eval_config, eval_run)
            trained = next(r for r in table if r["kind"] == "step" and r["step"] == 4)
            with step_run(demo_run, "register") as register_run:
                version = register_model(
                    checkpoint,
                    config.registered_name,
                    run=register_run,
                    metrics={"val_loss": trained["loss"], "val_acc": trained["acc"]},
                    training_run_id=train_run.run_id,
                    alias="demo",
                )
        uri = f"models:/{config.registered_name}/{version.version}"
        print(f"      runs in {tracking_uri} (run {demo_run.run_id}); model registered as {uri}")
    finally:
        if server is not None:
            server.stop()
            print("      the runs are in runs/mlflow: `looplm mlflow` serves them and prints the UI address")
    return uri


def run_from_args(args: argparse.Namespace) -> int:
    run(DemoConfig(output=args.output) if args.output else DemoConfig())
    return 0


if __name__ == "__main__":
    run()
