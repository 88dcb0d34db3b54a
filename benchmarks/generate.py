"""Our continuous batching (`TransformersEngine`, `rebase/generate/batching.py`) vs transformers' own
(`model.generate_batch`, its ContinuousBatchingManager), same model, same prompts, same process, same run.

    python benchmarks/generate.py [--prompts 16] [--max-new-tokens 64] [--batch-size 16] [--model NAME]

Prompts: the teacher's transform prompts (`rebase.teacher.prompts.transform_prompt`) for
jobs/tasks/navigate.yaml over fixed synthetic rows, with the built-in teacher `builtin:gemma3-270m`
(float32, CPU), greedy. Measured, output tokens per wall second and per CPU second of the process over
the whole call (the steadier figure on a shared machine):
- ours with the teacher's xgrammar JSON constraint (as `rebase transform` runs it), and without it;
- the library's `generate_batch` (no constraint: see below), without its warm-up pass (ours has none);
- how many answers the two unconstrained runs share token for token (both greedy, float32);
- whether the library path takes what the teacher needs: a logits processor (the xgrammar constraint is a
  per-request, stateful one) and stop strings, each tried on two prompts and judged from its output.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor

ROOT = Path(__file__).resolve().parent.parent
TURNS = ["Take 1 step.", "Take 2 steps.", "Take 3 steps.", "Turn left.", "Turn right.", "Turn around."]


def teacher_prompts(count: int) -> tuple[list[str], dict]:
    """`count` transform prompts over fixed synthetic navigate-like rows, and the answer's JSON schema."""
    from rebase.task import load_task
    from rebase.teacher.prompts import output_schema, transform_prompt

    task = load_task(ROOT / "jobs" / "tasks" / "navigate.yaml")
    rng = random.Random(0)
    rows = [
        {
            "question": " ".join(rng.choice(TURNS) for _ in range(rng.randint(2, 8))),
            "answer": rng.choice(["True", "False"]),
        }
        for _ in range(count)
    ]
    return [transform_prompt(task, row) for row in rows], output_schema(task)


def measured(what: str, tokens: int, wall: float, cpu: float) -> dict:
    """Output tokens per wall second and per CPU second of this process (all its threads): on a shared
    machine the CPU figure is the steadier one."""
    result = {
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2),
        "tokens_per_cpu_second": round(tokens / cpu, 2),
    }
    print(f"{what}: {result}", file=sys.stderr, flush=True)
    return result


def ours(engine, prompts: list[str], params, what: str) -> tuple[dict, list[str]]:
    wall, cpu = time.perf_counter(), time.process_time()
    completions = engine.generate(prompts, params)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(c.completion_tokens for c in completions)
    return measured(what, tokens, wall, cpu), [c.text for c in completions]


def library(model, ids: list[list[int]], config, **options) -> tuple[list[list[int]], float, float]:
    """transformers' continuous batching on token ids (no warm-up pass: ours has none either): each answer's
    new tokens, wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    outputs = model.generate_batch(inputs=ids, generation_config=config, progress_bar=False, warmup=False, **options)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return [output.generated_tokens for output in outputs.values()], wall, cpu


class OnlyToken(LogitsProcessor):
    """Allows one token only: an answer made of anything else shows the processor was not applied."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token] = 0
        return forced


def library_capabilities(model, tokenizer, ids, texts, answers, config, batching) -> tuple[bool, bool]:
    """Whether `generate_batch` applies a logits processor (one allowing a single token) and a stop string
    (one from inside its own answer), each judged from what it then generates."""
    from transformers import GenerationConfig

    [dot] = tokenizer.encode(".", add_special_tokens=False)
    short = GenerationConfig(**{**config.to_diff_dict(), "max_new_tokens": 8})
    forced, _, _ = library(
        model, ids[:2], short, continuous_batching_config=batching, logits_processor=[OnlyToken(dot)]
    )
    processor_honoured = all(set(answer) <= {dot} for answer in forced)
    row = next(n for n, text in enumerate(texts) if len(text) >= 8)
    stop = texts[row][4:6]
    with_stop = GenerationConfig(**{**config.to_diff_dict(), "stop_strings": [stop]})
    stopped, _, _ = library(model, [ids[row]], with_stop, continuous_batching_config=batching, tokenizer=tokenizer)
    return processor_honoured, len(stopped[0]) < len(answers[row])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="builtin:gemma3-270m", help="a built-in, local directory or HF id")
    args = parser.parse_args()

    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from rebase.generate.engines import GenerationParams, TransformersEngine
    from rebase.models import resolve_model

    prompts, schema = teacher_prompts(args.prompts)
    engine = TransformersEngine(str(resolve_model(args.model)), batch_size=args.batch_size)
    model, tokenizer = engine.model, engine.tokenizer
    ids = [engine.encode(p) for p in prompts]
    stops = sorted(engine.stop_ids)

    engine.grammar(schema)  # compiled once per schema and engine: not part of decoding
    constrained, constrained_texts = ours(
        engine, prompts, GenerationParams(args.max_new_tokens, json_schema=schema), "ours, constrained"
    )
    free, free_texts = ours(engine, prompts, GenerationParams(args.max_new_tokens), "ours, unconstrained")

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=0)
    # Sized by hand: on a CPU the library would otherwise reserve 60% of the machine's memory for its cache.
    pages = math.ceil((max(map(len, ids)) + args.max_new_tokens) / 256)
    batching = ContinuousBatchingConfig(
        page_size=256,
        num_blocks=args.batch_size * pages + 4,
        max_batch_tokens=4096,
        max_requests_per_batch=args.batch_size,
    )
    answers, wall, cpu = library(model, ids, config, continuous_batching_config=batching)
    answers = [[t for t in answer if t not in engine.stop_ids] for answer in answers]
    theirs = measured("transformers generate_batch", sum(len(answer) for answer in answers), wall, cpu)
    texts = [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
    same = sum(a == b for a, b in zip(texts, free_texts))

    processor_honoured, stop_honoured = library_capabilities(model, tokenizer, ids, texts, answers, config, batching)

    parsed = sum(_parses(text) for text in constrained_texts)
    report = {
        "model": f"{args.model} ({model.dtype}, {engine.device})",
        "torch_threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "prompt_tokens": [min(map(len, ids)), max(map(len, ids))],
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "ours_constrained": constrained | {"parsed_json": parsed},
        "ours_unconstrained": free,
        "library_unconstrained": theirs,
        "same_answers_unconstrained": f"{same}/{len(prompts)}",
        "library_takes_logits_processor": processor_honoured,
        "library_takes_stop_strings": stop_honoured,
        "ratio_ours_unconstrained_to_library_wall": _ratio(free, theirs, "tokens_per_second"),
        "ratio_ours_unconstrained_to_library_cpu": _ratio(free, theirs, "tokens_per_cpu_second"),
        "ratio_ours_constrained_to_library_cpu": _ratio(constrained, theirs, "tokens_per_cpu_second"),
    }
    print(json.dumps(report, indent=2))
    print(
        f"generate: ours {free['tokens_per_cpu_second']} tokens per CPU second unconstrained "
        f"({constrained['tokens_per_cpu_second']} constrained), transformers generate_batch "
        f"{theirs['tokens_per_cpu_second']} (unconstrained): {report['ratio_ours_unconstrained_to_library_cpu']}x "
        f"({report['ratio_ours_unconstrained_to_library_wall']}x in wall time); the library takes a logits "
        f"processor: {processor_honoured}, stop strings: {stop_honoured}"
    )


def _ratio(ours: dict, theirs: dict, key: str) -> float:
    return round(ours[key] / theirs[key], 2)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
