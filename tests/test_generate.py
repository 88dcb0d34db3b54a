"""The generation layer without Ray: KV-cache layout helpers on tiny tensors, and the continuous-batching loop
on a tiny random-weight Gemma 3 (a sliding-window layer and a full one; a byte-level ASCII tokenizer) checked
token for token against `model.generate` on each prompt alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from rebase.generate.batching import ContinuousBatch, common_prefix_length, kept_positions, merge, pad_left, trim
from rebase.generate.engines import GenerationParams, TransformersEngine, cut_at_stop, vllm_llm_kwargs

WINDOW = 48  # the sliding layer's window: longer than the shared head, shorter than the longest prompts
HEAD = "Rewrite the review in one short sentence. "  # 42 tokens (one per character), shared by the prompts
REVIEWS = ["great film", "a long and boring plot with no end", "ok", "loved the music, hated the ending", "meh."]


def positions(values: list[float], rows: int = 1):
    """A (rows, 1 head, len(values), 1) cache tensor holding `values` along the positions."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1, 1).repeat(rows, 1, 1, 1)


def flat(tensor) -> list:
    return tensor[:, 0, :, 0].tolist()


def two_layer_cache(values: list[float], rows: int = 1, window: int = 4) -> DynamicCache:
    """A real cache with a full layer and a sliding-window layer (which keeps the last window - 1)."""
    keys = positions(values, rows)
    return DynamicCache([(keys, keys.clone()), (keys.clone(), keys.clone(), torch.tensor(window))])


# ---------------------------------------------------------------- cache layout on tiny tensors


def test_pad_left_adds_zero_positions_in_front():
    assert flat(pad_left(positions([1, 2]), 4)) == [[0, 0, 1, 2]]
    same = positions([1, 2, 3])
    assert pad_left(same, 2) is same


def test_kept_positions_of_full_and_sliding_window_layers():
    cache = two_layer_cache([1, 2])
    full, sliding = cache.layers
    assert kept_positions(full, 10) == 10
    assert kept_positions(sliding, 10) == 3 and sliding.cumulative_length == 10  # window 4 keeps 3
    assert kept_positions(sliding, 2) == 2 and sliding.cumulative_length == 2


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 1], [6, 1]]) == 0
    assert common_prefix_length([[1, 2], [1, 2]]) == 2


def test_merge_pads_the_shorter_batch_on_the_left_in_both_layers():
    cache = two_layer_cache([1, 2, 3, 4, 5])  # sliding layer holds [3, 4, 5]
    mask = torch.ones(1, 5, dtype=torch.long)
    other = two_layer_cache([7, 8], rows=2)
    other_mask = torch.tensor([[1, 1], [0, 1]])
    merged, merged_mask = merge(cache, mask, other, other_mask)
    full, sliding = merged.layers
    assert flat(full.keys) == [[1, 2, 3, 4, 5], [0, 0, 0, 7, 8], [0, 0, 0, 7, 8]]
    assert flat(sliding.values) == [[3, 4, 5], [0, 7, 8], [0, 7, 8]]
    assert sliding.cumulative_length == 5
    assert merged_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]


def test_trim_cuts_positions_that_are_padding_for_every_row_once_past_the_slack():
    cache = two_layer_cache([0, 0, 0, 1, 2, 3], rows=2, window=4)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    kept, kept_mask = trim(cache, mask, slack=4)
    assert kept is cache and kept_mask is mask  # 3 padding positions: under the slack, left alone
    trimmed, trimmed_mask = trim(cache, mask, slack=2)
    full, sliding = trimmed.layers
    assert trimmed_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert flat(full.keys) == [[1, 2, 3], [1, 2, 3]]
    assert flat(sliding.keys) == [[1, 2, 3], [1, 2, 3]] and sliding.cumulative_length == 3


def test_cut_at_stop_and_vllm_arguments():
    assert cut_at_stop("yes\nQ: more", ["\nQ:", "more"]) == ("yes", True)
    assert cut_at_stop("yes", None) == ("yes", False)
    options = {"batch_size": 8, "gpu_memory_utilization": 0.8, "max_model_len": None, "threads": 2}
    assert vllm_llm_kwargs("/models/x", **options) == {
        "model": "/models/x",
        "enable_prefix_caching": True,
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        "gpu_memory_utilization": 0.8,
    }


# ---------------------------------------------------------------- the decode loop on a tiny Gemma 3


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-gemma3")
    # byte-level BPE without merges over printable ASCII: one token per character, exact decoding
    characters = ["\u010a", "\u0120"] + [chr(b) for b in range(33, 127)]  # newline and space as byte-level spells them
    vocab = {token: number for number, token in enumerate(["<pad>", "<bos>", "<eos>"] + characters)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(directory)
    config = Gemma3TextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def engine(tiny_gemma) -> TransformersEngine:
    return TransformersEngine(tiny_gemma, batch_size=2, threads=1)


def reference(engine: TransformersEngine, prompt: str, max_new_tokens: int, logits_processor=None) -> list[int]:
    """`model.generate` on the prompt alone, greedy: the new tokens before the first end token."""
    encoded = engine.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = engine.model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            logits_processor=logits_processor,
        )
    new = output[0, encoded["input_ids"].shape[1] :].tolist()
    return new[: next((n for n, token in enumerate(new) if token in engine.stop_ids), len(new))]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_continuous_batching_equals_generate_with_rows_joining_mid_decode(engine, share_prefix):
    """Five prompts with a shared head through two places, each with its own length, so rows leave at
    different steps and waiting prompts join a running batch (padding, merge, trim, sliding window)."""
    prompts = [HEAD + review for review in REVIEWS]
    lengths = [3, 20, 9, 14, 6]
    ids = [engine.encode(p) for p in prompts]
    assert min(len(x) for x in ids) < WINDOW < max(len(x) for x in ids) + max(lengths)
    engine.share_prefix = share_prefix
    assert ContinuousBatch(engine, ids, [GenerationParams()] * 5).prefix == (
        ids[0][: len(HEAD)] if share_prefix else []
    )
    try:
        steps = list(engine.steps(ids, [GenerationParams(n) for n in lengths]))
    finally:
        engine.share_prefix = True
    assert all(len({row for row, _, _ in step}) == len(step) for step in steps)  # a step is one forward pass
    events = [event for step in steps for event in step]
    for row, (prompt, length) in enumerate(zip(prompts, lengths)):
        tokens = [token for r, token, _ in events if r == row and token is not None]
        assert tokens == reference(engine, prompt, length), f"prompt {row}"
        assert [finished for r, _, finished in events if r == row][-1] is True
    order = [r for r, _, _ in events]
    assert order[:4] == [0, 1, 0, 1]  # two places: the first two prompts start together
    assert order.index(2) < len(order) - order[::-1].index(1)  # the third joins while the second still runs


@pytest.mark.parametrize("share_prefix", [True, False])
def test_prefill_of_left_padded_rows_gives_the_logits_of_each_prompt_alone(engine, share_prefix):
    """Greedy tokens of a random model hardly depend on the context, so the cache layout of a prefill
    (left padding, the shared head's cache laid out behind it) is checked on the logits themselves."""
    ids = [engine.encode(HEAD + review) for review in REVIEWS]
    engine.share_prefix = share_prefix
    try:
        batch = ContinuousBatch(engine, ids, [GenerationParams()] * len(ids))
    finally:
        engine.share_prefix = True
    group = [0, 1, 3]  # 52, 76 and 75 tokens
    with torch.inference_mode():
        _, mask, last_positions, logits = batch._prefill(group)
        alone = torch.stack([engine.model(torch.tensor([ids[n]])).logits[0, -1] for n in group])
    assert torch.allclose(logits, alone, atol=1e-5)
    assert last_positions[:, 0].tolist() == [len(ids[n]) - 1 for n in group]
    assert mask.sum(dim=1).tolist() == [len(ids[n]) for n in group]


def test_generate_honours_max_new_tokens_and_stop_strings(engine):
    prompts = ["ok", HEAD + "great film", "The capital of France is"]
    expected = [engine.tokenizer.decode(reference(engine, p, 24)) for p in prompts]
    plain = engine.generate(prompts, GenerationParams(max_new_tokens=24))
    assert [c.text for c in plain] == expected
    assert [(c.completion_tokens, c.finish_reason) for c in plain] == [
        (len(text), "length" if len(text) == 24 else "stop") for text in expected
    ]
    assert [c.prompt_tokens for c in plain] == [len(engine.encode(p)) for p in prompts]
    # a stop string from inside each answer: the text ends before it, at the token that completed it
    stops = []
    for text in expected:
        start = next(k for k in range(3, len(text) - 2) if text.find(text[k : k + 2]) == k)
        stops.append(text[start : start + 2])
    for prompt, text, stop in zip(prompts, expected, stops):
        [completion] = engine.generate([prompt], GenerationParams(max_new_tokens=24, stop=[stop]))
        assert completion.text == text[: text.find(stop)] and completion.finish_reason == "stop"
        assert completion.completion_tokens == text.find(stop) + len(stop)  # one token per character


def test_json_schema_constrains_each_row_as_xgrammar_does_in_generate(engine):
    from xgrammar.contrib.hf import LogitsProcessor

    schema = {
        "type": "object",
        "properties": {"reason": {"type": "string", "maxLength": 10}, "answer": {"enum": ["yes", "no"]}},
        "required": ["reason", "answer"],
        "additionalProperties": False,
    }
    prompts = [HEAD + review for review in REVIEWS[:3]]
    ours = engine.generate(prompts, GenerationParams(max_new_tokens=64, json_schema=schema))
    for completion, prompt in zip(ours, prompts):
        expected = reference(engine, prompt, 64, [LogitsProcessor(engine.grammar(schema))])
        assert completion.text == engine.tokenizer.decode(expected)
        assert completion.finish_reason == "stop"
        assert set(json.loads(completion.text)) == {"reason", "answer"}


def test_generate_reports_each_prompt_as_it_finishes(engine):
    """Progress per prompt: `on_done` hears of rows as they end (two places, five prompts of five lengths),
    not once per call."""
    heard: list[int] = []
    rows = [GenerationParams(max_new_tokens=n) for n in (3, 20, 9, 14, 6)]
    prompts = [HEAD + review for review in REVIEWS]
    for prompt, params in zip(prompts, rows):  # one call per length, then all five in one call
        heard.clear()
        engine.generate([prompt], params, on_done=heard.append)
        assert heard == [1]
    heard.clear()
    engine.generate(prompts, GenerationParams(max_new_tokens=12), on_done=heard.append)
    assert sum(heard) == 5 and len(heard) >= 3  # two at a time: at least three separate reports


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_loads_the_precision_asked_for(tiny_gemma, dtype):
    engine = TransformersEngine(tiny_gemma, batch_size=2, threads=1, dtype=dtype)
    assert engine.dtype == dtype and str(engine.model.dtype) == f"torch.{dtype}"
    [completion] = engine.generate([HEAD + "ok"], GenerationParams(max_new_tokens=4))
    assert completion.completion_tokens <= 4


@pytest.fixture(scope="module")
def adapters(tiny_gemma, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Two LoRA adapters of the tiny model with random (not zero) weights, as peft saves them, each with the
    model it merges into: name -> (adapter directory, merged model directory)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rebase.models import building_peft_model

    made = {}
    for seed, name in enumerate(["alpha", "beta"]):
        torch.manual_seed(seed + 1)
        base = AutoModelForCausalLM.from_pretrained(tiny_gemma, dtype=torch.float32)
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        )
        with building_peft_model():
            model = get_peft_model(base, config)
        root = tmp_path_factory.mktemp(name)
        model.save_pretrained(root / "adapter")
        model.merge_and_unload().save_pretrained(root / "merged")
        engine = TransformersEngine(tiny_gemma)
        engine.tokenizer.save_pretrained(root / "merged")
        made[name] = (str(root / "adapter"), str(root / "merged"))
    return made


@pytest.mark.parametrize("share_prefix", [True, False])
def test_one_base_with_adapters_decodes_each_row_as_its_merged_model_would(tiny_gemma, adapters, share_prefix):
    """Rows of two adapters and of the base share every forward pass (peft mixed batches); each row's tokens
    are those of its own model (the merged adapter, or the base) decoding the prompt alone, rows joining
    mid-decode; a batch of one adapter shares its prompts' head as a single model's would."""
    from rebase.generate.engines import BASE_ADAPTER

    engine = TransformersEngine(
        tiny_gemma,
        batch_size=3,
        threads=1,
        share_prefix=share_prefix,
        dtype="float32",
        adapters={name: path for name, (path, _) in adapters.items()},
    )
    assert engine.adapters == ["alpha", "beta"]
    prompts = [HEAD + review for review in REVIEWS]
    names = ["alpha", "beta", BASE_ADAPTER, "beta", "alpha"]
    lengths = [6, 12, 4, 9, 7]
    ids = [engine.encode(p) for p in prompts]
    mixed = engine.batch(ids, [GenerationParams(n) for n in lengths], adapters=names)
    assert mixed.prefix == []  # several adapters: no shared head
    events = [event for step in mixed.steps() for event in step]
    alone = {name: TransformersEngine(merged, threads=1, dtype="float32") for name, (_, merged) in adapters.items()}
    alone[BASE_ADAPTER] = TransformersEngine(tiny_gemma, threads=1, dtype="float32")
    expected = [reference(alone[name], prompt, n) for name, prompt, n in zip(names, prompts, lengths)]
    got = [[token for r, token, _ in events if r == row and token is not None] for row in range(len(prompts))]
    assert got == expected
    assert len({tuple(tokens) for tokens in expected[:3]}) == 3  # the three models do answer differently

    single = engine.batch(ids[:2], [GenerationParams(5)] * 2, adapters=["beta", "beta"])
    assert single.prefix == (ids[0][: len(HEAD)] if share_prefix else [])
    events = [event for step in single.steps() for event in step]
    tokens = [[token for r, token, _ in events if r == row and token is not None] for row in range(2)]
    assert tokens == [reference(alone["beta"], prompts[row], 5) for row in range(2)]
    with torch.inference_mode():
        _, _, _, logits = engine.batch(ids[:3], [GenerationParams()] * 3, adapters=names[:3])._prefill([0, 1, 2])
        own = torch.stack([alone[name].model(torch.tensor([ids[n]])).logits[0, -1] for n, name in enumerate(names[:3])])
    assert torch.allclose(logits, own, atol=1e-4)
