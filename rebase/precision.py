"""Numeric precision of the model stages (`dtype` in each stage's config).

`auto` picks bfloat16 where the hardware computes it natively: a GPU that supports it, or a CPU with
avx512_bf16 or AMX (read from the CPU's flags, not guessed), and float32 elsewhere. `float32` reproduces
runs made before precision was a setting. Weights are stored and exported in float32 either way.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from rebase.errors import RebaseError

Precision = Literal["auto", "float32", "bfloat16"]
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (Linux /proc/cpuinfo); empty where the file does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def resolve(dtype: str, device: str) -> str:
    """The precision `dtype` means on `device` ("cpu" or "cuda"): "float32" or "bfloat16"."""
    if dtype != "auto":
        return dtype
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def describe(dtype: str, gpus: bool) -> str:
    """What `dtype` will mean on the workers, as a driver without their device can tell it."""
    if not gpus:
        return resolve(dtype, "cpu")
    return "auto (bfloat16 where the GPU has it)" if dtype == "auto" else dtype


def check(dtype: str, gpus: bool, what: str) -> None:
    """Refuse bfloat16 asked for on CPUs without it (torch would emulate it, slower than float32)."""
    if dtype == "bfloat16" and not gpus and not cpu_has_native_bf16():
        raise RebaseError(
            f"{what}: dtype bfloat16 needs a GPU or a CPU with native bfloat16 (avx512_bf16 or AMX), and this "
            "machine has neither; use dtype auto or float32"
        )


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def hashed(dtype: str, engine: str = "transformers") -> dict:
    """The precision as it enters a stage's fingerprint: nothing for float32, so directories made before
    precision was a setting (all float32) stay recognised with `dtype: float32`, and nothing for an
    endpoint (engine openai), whose precision is the server's."""
    return {} if dtype == "float32" or engine == "openai" else {"dtype": dtype}
