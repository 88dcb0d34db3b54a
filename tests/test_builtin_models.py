"""The built-in models from PyPI packages, loaded for real (slow: the GGUF conversion takes about 30 s)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from rebase.io import cache_dir
from rebase.models import resolve_model


@pytest.mark.slow
def test_builtin_gemma_is_converted_once_and_generates(tmp_path, monkeypatch):
    users_cache = cache_dir() / "models" / "gemma3-270m"
    monkeypatch.setenv("REBASE_CACHE", str(tmp_path / "cache"))
    path = resolve_model("builtin:gemma3-270m")
    assert path == tmp_path / "cache" / "models" / "gemma3-270m"
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))
    assert not list((tmp_path / "cache" / "models").glob("*.partial"))
    if not users_cache.exists():  # a fresh machine: the rest of the session uses this conversion, not a second
        shutil.copytree(path, users_cache.with_name("gemma3-270m.partial"), dirs_exist_ok=True)
        os.replace(users_cache.with_name("gemma3-270m.partial"), users_cache)

    started = time.monotonic()
    assert resolve_model("builtin:gemma3-270m") == path  # cached: no second conversion
    assert time.monotonic() - started < 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "capital" in text or "Paris" in text  # a coherent continuation, not noise from bad weights
    with torch.no_grad():
        loss = model(
            **tokenizer("The cat sat on the mat.", return_tensors="pt"),
            labels=tokenizer("The cat sat on the mat.", return_tensors="pt")["input_ids"],
        ).loss
    assert float(loss) < 6.0  # a random model scores about ln(262k) = 12.5


def test_builtin_minilm_embeds_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_model("builtin:minilm")), device="cpu")
    vectors = model.encode(
        ["a cat sits on a mat", "a kitten rests on a rug", "quarterly tax filing"], normalize_embeddings=True
    )
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_builtin_minilm_in_bfloat16_stays_close_to_float32():
    import numpy as np

    from rebase.datastore.embed import Embedder

    texts = ["a cat sits on a mat", "quarterly tax filing", "Take 3 steps. Turn around. Take 3 steps."]
    full = Embedder(str(resolve_model("builtin:minilm")), dtype="float32")
    half = Embedder(str(resolve_model("builtin:minilm")), dtype="bfloat16")
    assert (full.dtype, half.dtype) == ("float32", "bfloat16")
    ours, theirs = half.encode(texts), full.encode(texts)
    assert ours.dtype == np.float32 and np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    assert (ours * theirs).sum(axis=1).min() > 0.99
