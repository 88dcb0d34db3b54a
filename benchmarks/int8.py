"""int8 through torchao against float32 and bfloat16 for the built-in Gemma's generation, one process.

    pip install torchao==0.18.0   # not a rebase dependency; only this benchmark imports it
    python benchmarks/int8.py

The built-in Gemma 3 270M, `model.generate` (greedy, 48 new tokens) on 16 left-padded prompts in one
batch, the shape of the teacher's and evaluation's decoding: generated tokens per second and how many of
the 16 answers equal float32's, for float32, bfloat16, torchao's int8 dynamic quantization (int8
activations and weights, from float32) and torchao's int8 weight-only quantization (bfloat16
activations). Eager mode, as rebase runs its models (no torch.compile).
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rebase.models import resolve_model

PROMPTS = [
    f"Question {i}: If you take {i} steps forward and {i + 2} steps back, where are you? Let's think step by step. " * 3
    for i in range(16)
]


def run(model, tokenizer, label: str) -> list[str]:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**tokenizer(PROMPTS[:2], return_tensors="pt", padding=True), max_new_tokens=4, do_sample=False)
        started = time.monotonic()
        out = model.generate(**batch, max_new_tokens=48, do_sample=False)
        seconds = time.monotonic() - started
    generated = out[:, batch["input_ids"].shape[1] :]
    print(f"{label}: {int((generated != tokenizer.pad_token_id).sum()) / seconds:.1f} generated tokens/s", flush=True)
    return tokenizer.batch_decode(generated, skip_special_tokens=True)


def main() -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    path = resolve_model("builtin:gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    reference = run(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer, "float32")
    variants = [
        ("bfloat16", None, torch.bfloat16),
        ("int8 dynamic (activations and weights), torchao", Int8DynamicActivationInt8WeightConfig(), torch.float32),
        ("int8 weight-only, bfloat16 activations, torchao", Int8WeightOnlyConfig(), torch.bfloat16),
    ]
    for label, config, dtype in variants:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        if config is not None:
            quantize_(model, config)
        answers = run(model, tokenizer, label)
        print(f"  answers equal to float32's: {sum(a == b for a, b in zip(reference, answers))} of {len(answers)}")


if __name__ == "__main__":
    main()
