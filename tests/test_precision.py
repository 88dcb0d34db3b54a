"""Precision settings: what `auto` resolves to from the CPU's flags, bfloat16 refused where the CPU lacks it,
fingerprints that keep float32 directories made before precision existed, and bfloat16 autocast in training."""

from __future__ import annotations

import pytest
import torch

from rebase import precision
from rebase.config import DatastoreConfig, TransformConfig
from rebase.errors import RebaseError
from rebase.pipeline import _settings_hash
from rebase.progress import heartbeat, progress_bar


@pytest.fixture
def flags(monkeypatch):
    """Set this machine's CPU flags as the detection reads them."""

    def set_flags(*names: str) -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(names))

    return set_flags


def test_auto_follows_the_cpus_native_bfloat16(flags):
    flags("avx2", "avx512f", "avx512_bf16")
    assert precision.resolve("auto", "cpu") == "bfloat16" and precision.cpu_has_native_bf16()
    flags("avx2", "amx_bf16", "amx_tile")
    assert precision.resolve("auto", "cpu") == "bfloat16"
    flags("avx2", "avx512f")
    assert precision.resolve("auto", "cpu") == "float32"
    assert precision.resolve("bfloat16", "cpu") == "bfloat16" and precision.resolve("float32", "cpu") == "float32"
    assert precision.describe("auto", gpus=False) == "float32"
    assert precision.describe("auto", gpus=True).startswith("auto")


def test_bfloat16_without_native_support_is_refused_unless_there_are_gpus(flags):
    flags("avx2")
    with pytest.raises(RebaseError, match="dtype bfloat16 needs a GPU or a CPU with native bfloat16"):
        precision.check("bfloat16", gpus=False, what="transform")
    precision.check("bfloat16", gpus=True, what="transform")
    precision.check("auto", gpus=False, what="transform")
    flags("avx512_bf16")
    precision.check("bfloat16", gpus=False, what="transform")


def test_this_machines_flags_are_read_from_proc_cpuinfo():
    flags = precision.cpu_flags()
    assert not flags or "fpu" in flags or "fp" in flags or "neon" in flags or "sse2" in flags


def test_fingerprints_keep_float32_directories_made_before_precision(tmp_path):
    assert precision.hashed("float32") == {} and precision.hashed("auto") == {"dtype": "auto"}
    assert precision.hashed("bfloat16", engine="openai") == {}
    # A pipeline stage finished before the settings existed hashes the same with their defaults.
    config = DatastoreConfig(sources=["bigbench"], out=tmp_path)
    before = config.model_dump(mode="json")
    del before["embed_dtype"]
    import hashlib
    import json

    old = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert _settings_hash(config) == old
    assert _settings_hash(config.model_copy(update={"embed_dtype": "float32"})) != old
    transform = TransformConfig(retrieved=tmp_path, task=tmp_path, out=tmp_path)
    assert _settings_hash(transform) != _settings_hash(transform.model_copy(update={"dtype": "bfloat16"}))


def test_training_autocasts_the_forward_pass_only_in_bfloat16(flags):
    from rebase.train import LoopSettings, autocast

    settings = LoopSettings(
        model_path="m", lora=None, learning_rate=1e-3, weight_decay=0.0, warmup_steps=0, batch_size=1,
        gradient_accumulation=1, epochs=1, total_steps=1, checkpoint_every=None, zero_stage=0, use_gpu=False,
        threads=None, pad_id=0, seed=0, dtype="auto",
    )  # fmt: skip
    layer = torch.nn.Linear(8, 8)
    flags("avx512_bf16")
    with autocast(settings):
        assert layer(torch.ones(1, 8)).dtype == torch.bfloat16
    flags("avx2")
    with autocast(settings):
        assert layer(torch.ones(1, 8)).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # master weights stay float32


def test_progress_moves_to_the_reported_position_between_calls():
    done = {"count": 0}
    bar = progress_bar(total=10, desc="test", unit="prompt", disable=False)
    with bar, heartbeat(bar, every=0.05, position=lambda: done["count"]) as sync:
        done["count"] = 3
        import time

        deadline = time.monotonic() + 5
        while bar.n < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bar.n == 3  # moved by the heartbeat, before any call came back
        done["count"] = 25  # a retried call counted twice: never past the total
        sync()
        assert bar.n == 10
