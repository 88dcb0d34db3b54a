"""The CUDA paths CI cannot reach, checked on a GPU machine that has torch, transformers and
sentence-transformers but not Ray, rebase's other dependencies, the network or the built-in weights:

    python benchmarks/gpu_check.py

Models are built here with random weights (a tiny Gemma 3 with sliding-window layers and a word-level
tokenizer; a tiny BERT sentence encoder), so nothing is downloaded. Checked, on `cuda` when present:
1. the transformers teacher engine's own decode loop (continuous batching, shared-prefix cache, left
   padding, rows leaving and joining) gives exactly what `generate` gives for each prompt alone, greedy,
   with the model in float32 on the device;
2. the engine as it runs on a GPU (bfloat16): 64 prompts through 16 places, every answer within its
   token budget, and how many agree with `generate` token for token (bfloat16 rounding differs between
   batch shapes, so this is reported, not required), with decode tokens per second;
3. the datastore embedder (`rebase.datastore.embed.Embedder`) on the device against the same model on
   the CPU: cosine similarity of every vector;
4. one base with two LoRA adapters (what `rebase serve` holds for several students; random, non-zero
   adapters made with peft): a batch mixing both adapters and the base, float32 on the device, gives each
   row what its own merged model's `generate` gives; and, in bfloat16, the time of a mixed batch on the
   shared base against a batch on a merged model.
Prints one JSON report; exits 1 when check 1, 3 or 4 fails. Runs on a CPU-only machine too (then it only
checks the script). `rebase/generate/engines.py` and `rebase/datastore/embed.py` are loaded from this
checkout without importing the rest of the package (which needs pyarrow, pydantic and Ray).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = (  # noqa: SIM905
    "the a review film movie book story plot actor music great good bad boring long short sentence "
    "rewrite keep meaning sentiment one in and of to was is it very not really loved hated liked "
    "ending start scene character funny sad dark bright slow fast quiet loud new old"
).split()


def load(name: str, path: Path, stubs: dict[str, dict] | None = None):
    """Import one rebase module from its file, with stand-ins for package modules it imports at the top
    (only those this script does not use)."""
    for stub, attributes in (stubs or {}).items():
        if stub not in sys.modules:
            module = types.ModuleType(stub)
            module.__dict__.update(attributes)
            sys.modules[stub] = module
    for package in ("rebase", "rebase.teacher", "rebase.datastore"):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(ROOT / package.replace(".", "/"))]
            sys.modules[package] = module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_gemma(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {token: number for number, token in enumerate(specials + WORDS + [".", ",", ":", "\n"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    config = Gemma3TextConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=8,  # shorter than the prompts: the windowed layers' cache handling is exercised
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    import torch

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(directory)


def tiny_encoder(directory: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as token_models
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: number for number, token in enumerate(specials + WORDS + [".", ","])}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
        )
    )
    raw = directory / "bert"
    bert.save_pretrained(raw)
    fast.save_pretrained(raw)
    encoder = models.Transformer(str(raw), max_seq_length=64)
    pooling = models.Pooling(encoder.get_word_embedding_dimension(), "mean")
    SentenceTransformer(modules=[encoder, pooling, models.Normalize()], device="cpu").save(str(directory / "st"))


def prompts(count: int, rng) -> list[str]:
    head = "rewrite the review in one short sentence . keep its meaning and its sentiment . " * 3
    return [f"{head}\nreview : {' '.join(rng.choice(WORDS, rng.integers(3, 20)))}\nrewritten :" for _ in range(count)]


def plain_generate(engine, prompt: str, max_new_tokens: int) -> tuple[str, int, int]:
    import torch

    encoded = engine.tokenizer(prompt, return_tensors="pt").to(engine.device)
    with torch.inference_mode():
        output = engine.model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None
        )
    new = output[0, encoded["input_ids"].shape[1] :].tolist()
    stop = next((n for n, token in enumerate(new) if token in engine.stop_ids), len(new))
    return engine.tokenizer.decode(new[:stop], skip_special_tokens=True), stop, encoded["input_ids"].shape[1]


def check_adapters(engines, model_dir: Path, tmp: Path, batch: list[str], report: dict) -> bool:
    """Check 4; True when it failed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters, merged = {}, {}
    for seed, name in enumerate(["alpha", "beta"]):
        torch.manual_seed(seed + 1)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        )
        model = get_peft_model(base, config)
        model.save_pretrained(tmp / name / "adapter")
        model.merge_and_unload().save_pretrained(tmp / name / "merged")
        engines.TransformersEngine(str(model_dir)).tokenizer.save_pretrained(tmp / name / "merged")
        adapters[name], merged[name] = str(tmp / name / "adapter"), str(tmp / name / "merged")
    names = ["alpha", "beta", engines.BASE_ADAPTER] * 2
    shared = engines.TransformersEngine(str(model_dir), batch_size=4, dtype="float32", adapters=adapters)
    alone = {name: engines.TransformersEngine(path, dtype="float32") for name, path in merged.items()}
    alone[engines.BASE_ADAPTER] = engines.TransformersEngine(str(model_dir), dtype="float32")
    ids = [shared.encode(prompt) for prompt in batch]
    decoded = shared.batch(ids, [engines.GenerationParams(24)] * len(ids), names).run()
    texts = [shared.tokenizer.decode(tokens, skip_special_tokens=True) for tokens, _ in decoded]
    expected = [plain_generate(alone[name], prompt, 24)[0] for name, prompt in zip(names, batch)]
    agree = sum(a == b for a, b in zip(texts, expected))
    report["adapters_float32_mixed_batch_equals_each_merged_generate"] = f"{agree}/{len(batch)}"
    report["adapters_models_differ"] = len(set(expected[:3])) == 3

    timed = {}
    for label, engine in (
        ("merged", engines.TransformersEngine(merged["alpha"], batch_size=32)),
        ("shared_mixed", engines.TransformersEngine(str(model_dir), batch_size=32, adapters=adapters)),
    ):
        rows = ["alpha", "beta"] * 16 if engine.adapters else None
        long = [engine.encode(prompt) for prompt in batch * 6][:32]
        engine.batch(long, [engines.GenerationParams(8)] * 32, rows).run()  # warm up
        torch.cuda.synchronize() if engine.device == "cuda" else None
        started = time.perf_counter()
        engine.batch(long, [engines.GenerationParams(48)] * 32, rows).run()
        torch.cuda.synchronize() if engine.device == "cuda" else None
        timed[label] = round(time.perf_counter() - started, 3)
    report["adapters_bfloat16_32_rows_seconds"] = timed
    return agree != len(batch) or not report["adapters_models_differ"]


def main() -> int:
    import numpy as np
    import torch

    errors = load("rebase.errors", ROOT / "rebase" / "errors.py")
    engines = load(
        "rebase.generate.engines", ROOT / "rebase" / "generate" / "engines.py", {"rebase.errors": vars(errors)}
    )
    try:
        import pyarrow  # noqa: F401

        stubs = {}
    except ImportError:  # the embedder needs neither pyarrow nor Ray: stand-ins for what embed.py imports
        stubs = {"pyarrow": {}, "pyarrow.parquet": {}}
    stubs["rebase.io"] = {
        "numpy_to_embeddings": None,
        "parquet_rows": None,
        "write_parquet_atomic": None,
        "cache_dir": None,
    }
    stubs["rebase.ray_setup"] = {"actor_pool": None}
    embed = load("rebase.datastore.embed", ROOT / "rebase" / "datastore" / "embed.py", stubs)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__}
    failed = False
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "gemma"
        tiny_gemma(model_dir)

        # 1. exact agreement of the decode loop with generate, float32 on the device
        engine = engines.TransformersEngine(str(model_dir), batch_size=3)
        report["engine_device"], report["engine_dtype"] = engine.device, str(engine.model.dtype)
        engine.model.float()
        params = engines.GenerationParams(max_new_tokens=24)
        batch = prompts(8, rng)
        ours = engine.generate(batch, params)
        agree = 0
        for completion, prompt in zip(ours, batch):
            text, tokens, prompt_tokens = plain_generate(engine, prompt, 24)
            agree += (completion.text, completion.completion_tokens, completion.prompt_tokens) == (
                text,
                tokens,
                prompt_tokens,
            )
        report["float32_decode_loop_equals_generate"] = f"{agree}/{len(batch)}"
        failed |= agree != len(batch)

        # 2. the engine as a GPU runs it (bfloat16 where supported): many prompts through a few places
        engine = engines.TransformersEngine(str(model_dir), batch_size=16)
        batch = prompts(64, rng)
        params = engines.GenerationParams(max_new_tokens=48)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        ours = engine.generate(batch, params)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        within = all(c.error is None and 0 <= c.completion_tokens <= 48 for c in ours)
        same = sum(c.text == plain_generate(engine, p, 48)[0] for c, p in zip(ours[:16], batch[:16]))
        report["engine_dtype_as_run"] = str(engine.model.dtype)
        report["as_run_64_prompts_within_budget"] = within
        report["as_run_agreeing_with_generate_of_16"] = same
        report["as_run_decode_tokens_per_second"] = round(sum(c.completion_tokens for c in ours) / seconds, 1)
        failed |= not within

        # 3. the embedder on the device vs the CPU
        tiny_encoder(Path(tmp))
        texts = [" ".join(rng.choice(WORDS, rng.integers(2, 40))) for _ in range(200)]
        embedder = embed.Embedder(str(Path(tmp) / "st"), batch_size=32, max_tokens=48)
        on_device = embedder.encode(texts)
        from sentence_transformers import SentenceTransformer

        cpu = SentenceTransformer(str(Path(tmp) / "st"), device="cpu")
        cpu.max_seq_length = 48
        reference = cpu.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        cosine = (on_device * reference).sum(1)
        report["embedder_device"] = str(embedder.model.device)
        report["embedder_min_cosine_to_cpu"] = round(float(cosine.min()), 6)
        report["embedder_norms"] = [round(float(n), 4) for n in np.linalg.norm(on_device, axis=1)[[0, -1]]]
        failed |= bool(cosine.min() < 0.999)
        # 4. one base, two adapters, rows of both and of the base in one batch
        failed |= check_adapters(engines, model_dir, Path(tmp), prompts(6, rng), report)
    report["passed"] = not failed
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
