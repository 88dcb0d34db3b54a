"""The transform stage vs one-prompt-at-a-time `generate`, same model, same prompts, same run.

    python benchmarks/transform.py [--retrieved out/retrieved/navigate] [--task jobs/tasks/navigate.yaml]
                                   [--prompts 128] [--baseline-prompts 6] [--validity-prompts 32]

Needs a retrieval (the README's main job, then `rebase retrieve`). Measures, with the built-in teacher:
- stage: `rebase.teacher.transform` on real Ray (one teacher actor, batched decoding, constrained JSON),
  output tokens per second over its generation time (actor start and model load included), and wall time;
- baseline: the same model loaded in this process, `model.generate` on one prompt at a time with the same
  xgrammar constraint and greedy decoding, on the first `--baseline-prompts` prompts;
- validity: the share of records that parse (and the share `ok`) with constrained decoding (the stage run
  above) and without it (a second stage run on its first `--validity-prompts` prompts; unconstrained, the
  small teacher rarely stops, so each answer runs to the token limit).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from rebase.config import TransformConfig, build_config
from rebase.models import resolve_model
from rebase.task import load_task
from rebase.teacher import transform
from rebase.teacher.prompts import output_schema, transform_prompt


def stage_run(args, out: Path, constrained: bool, prompts: int) -> dict:
    config = build_config(
        TransformConfig,
        {
            "retrieved": args.retrieved,
            "task": args.task,
            "out": out,
            "limit": prompts,
            "constrained": constrained,
            "max_new_tokens": args.max_new_tokens,
        },
    )
    started = time.monotonic()
    summary = transform(config)
    wall = time.monotonic() - started
    statuses = summary.statuses
    first = pq.read_table(out / "records.parquet").sort_by("rank").slice(0, args.validity_prompts).to_pylist()
    return {
        "prompts": prompts,
        "wall_seconds": round(wall, 1),
        "generation_seconds": round(summary.generation_seconds, 1),
        "completion_tokens": summary.completion_tokens,
        "tokens_per_second": round(summary.completion_tokens / summary.generation_seconds, 2),
        "statuses": statuses,
        "parsed_share": round(1 - statuses.get("parse_error", 0) / summary.rows, 3),
        "ok_share": round(statuses.get("ok", 0) / summary.rows, 3),
        "parsed_share_of_first": round(sum(r["status"] != "parse_error" for r in first) / len(first), 3),
    }


def baseline_run(args) -> dict:
    """Plain transformers: one prompt per `generate`, the same xgrammar constraint, greedy."""
    import torch
    import xgrammar
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from xgrammar.contrib.hf import LogitsProcessor

    task = load_task(args.task)
    rows = pq.read_table(Path(args.retrieved) / "rows.parquet").sort_by("rank").slice(0, args.baseline_prompts)
    prompts = [transform_prompt(task, json.loads(r)) for r in rows.column("row").to_pylist()]
    path = str(resolve_model("builtin:gemma3-270m"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    stops = sorted(set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id})
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=model.config.get_text_config().vocab_size, stop_token_ids=stops
    )
    grammar = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(output_schema(task)), any_whitespace=False)
    tokens = 0
    started = time.monotonic()
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(
                **encoded,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=[LogitsProcessor(grammar)],
            )
        new = output[0, encoded["input_ids"].shape[1] :].tolist()
        tokens += len([t for t in new if t not in stops])
    seconds = time.monotonic() - started
    return {
        "prompts": len(prompts),
        "seconds": round(seconds, 1),
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrieved", type=Path, default=Path("out/retrieved/navigate"))
    parser.add_argument("--task", type=Path, default=Path("jobs/tasks/navigate.yaml"))
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--baseline-prompts", type=int, default=6)
    parser.add_argument("--validity-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args()
    if not (args.retrieved / "_SUCCESS").exists():
        parser.error(f"{args.retrieved} is not a finished retrieval; run the README's main job and rebase retrieve")
    with tempfile.TemporaryDirectory() as tmp:
        constrained = stage_run(args, Path(tmp) / "constrained", True, args.prompts)
        free = stage_run(args, Path(tmp) / "unconstrained", False, args.validity_prompts)
    baseline = baseline_run(args)
    report = {
        "model": "builtin:gemma3-270m (float32, CPU)",
        "task": str(args.task),
        "settings": "TransformConfig defaults (batch_size 32, prompts_per_call 128, max_new_tokens 512, greedy)",
        "stage_constrained": constrained,
        "stage_unconstrained": free,
        "baseline_one_at_a_time_constrained": baseline,
        "speedup_tokens_per_second": round(constrained["tokens_per_second"] / baseline["tokens_per_second"], 2),
    }
    print(json.dumps(report, indent=2))
    print(
        f"transform: the stage makes {report['speedup_tokens_per_second']}x the output tokens/s of one-at-a-time "
        f"generate; on the first {args.validity_prompts} prompts {constrained['parsed_share_of_first']:.0%} parse with "
        f"constrained decoding, {free['parsed_share_of_first']:.0%} without"
    )


if __name__ == "__main__":
    main()
