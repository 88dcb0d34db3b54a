"""Teacher engines behind one interface: a batch of prompts in, completions out.

- `transformers`: the CPU default and a GPU fallback; batched generation with left padding, JSON output
  constrained by xgrammar (the grammar library vLLM uses) compiled from the answer's JSON schema.
- `vllm`: GPU clusters; vLLM's offline `LLM` inside our Ray actor, guided decoding through
  `StructuredOutputsParams(json=...)`, prefix caching (every prompt of a task shares its long head).
  Not runnable on the CI machine (no GPU): written against vLLM's documented API.
- `openai`: any OpenAI-compatible endpoint (a vLLM server, a hosted API); a thread per request up to a
  concurrency limit; the official SDK retries 408/409/429/5xx, connection errors and timeouts with
  exponential backoff; the key comes from an environment variable, never from a file or a flag.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from rebase.errors import RebaseError


@dataclass
class GenerationParams:
    max_new_tokens: int = 384
    temperature: float = 0.0
    json_schema: dict | None = None  # constrain the answer to this schema when the engine can


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length", or "error" (then `error` says why)
    error: str | None = None


class Engine(Protocol):
    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]: ...


class TransformersEngine:
    """A causal LM through `transformers.generate`, `batch_size` prompts per forward pass."""

    def __init__(self, model_path: str, batch_size: int = 16, threads: int | None = None, share_prefix: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.stop_ids.add(self.tokenizer.eos_token_id)
        self.chat = bool(self.tokenizer.chat_template)
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        self._grammars: dict[str, object] = {}

    def _grammar(self, schema: dict):
        import xgrammar

        key = json.dumps(schema)  # key order kept: the grammar writes properties in this order
        if key not in self._grammars:
            vocab_size = self.model.config.get_text_config().vocab_size
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(self.stop_ids)
            )
            self._grammars[key] = xgrammar.GrammarCompiler(info).compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def _format(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _prefix_fits(self, length: int) -> bool:
        """Share a prefix when it is long enough to matter and fits every attention window whole."""
        window = getattr(self.model.config.get_text_config(), "sliding_window", None)
        return self.share_prefix and length >= 32 and (window is None or length < window)

    def _prefix_cache(self, prefix: list[int], pads: list[int]):
        """The KV cache of the prompts' common prefix, computed once and laid out per row behind that row's
        left padding (row r caches `pads[r]` empty slots, then the first `len(prefix) - pads[r]` prefix
        tokens; generate recomputes the rest). Prompts of one task share their long head (instruction and
        examples), so prefill shrinks to the rows themselves: the saving vLLM's prefix caching makes."""
        import torch

        cache = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True, logits_to_keep=1).cache
        for layer in cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                heads, dimension = tensor.shape[1], tensor.shape[3]
                empty = [min(p, len(prefix)) for p in pads]  # a short row may cache padding only
                rows = [
                    torch.cat([tensor.new_zeros(1, heads, e, dimension), tensor[:, :, : len(prefix) - e]], 2)
                    for e in empty
                ]
                setattr(layer, name, torch.cat(rows))
        return cache

    def _decode(self, ids: list[list[int]], params: GenerationParams) -> list[tuple[list[int], bool]]:
        """(new tokens, stopped) for each prompt of one batch: left-padded prefill (from the shared-prefix cache
        when the prompts share a head), then one token per step for the rows still going. A row that stops
        leaves the batch and the cache at once, so the long answers of a few rows do not keep every row's
        width busy to the end (as `generate` does); greedy unless `params.temperature` > 0. With a schema,
        each row's xgrammar matcher masks the logits, so the answer can only be JSON of that schema."""
        import torch

        device = self.device
        width = max(len(x) for x in ids)
        pads = [width - len(x) for x in ids]
        input_ids = torch.tensor([[self.tokenizer.pad_token_id] * p + x for p, x in zip(pads, ids)], device=device)
        mask = torch.tensor([[0] * p + [1] * len(x) for p, x in zip(pads, ids)], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        shared = min(_common_prefix_length(ids), width - 1)  # every row keeps a token to compute
        cache, start = None, 0
        if len(ids) > 1 and self._prefix_fits(shared):
            cache, start = self._prefix_cache(ids[0][:shared], pads), shared
        matchers, bitmask = None, None
        if params.json_schema is not None:
            import xgrammar

            grammar = self._grammar(params.json_schema)
            matchers = [xgrammar.GrammarMatcher(grammar) for _ in ids]
            bitmask = xgrammar.allocate_token_bitmask(len(ids), grammar.tokenizer_info.vocab_size)
        rows = list(range(len(ids)))  # the prompt each batch position holds
        generated: list[list[int]] = [[] for _ in ids]
        stopped = [False] * len(ids)
        step_ids, step_positions = input_ids[:, start:], positions[:, start:]
        for _ in range(params.max_new_tokens):
            output = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = output.cache
            logits = output.logits[:, -1, :].float()
            if matchers is not None:
                for position, row in enumerate(rows):
                    matchers[row].fill_next_token_bitmask(bitmask, position)
                xgrammar.apply_token_bitmask_inplace(logits, bitmask[: len(rows)].to(logits.device))
            if params.temperature > 0:
                tokens = torch.multinomial(torch.softmax(logits / params.temperature, dim=-1), 1)[:, 0]
            else:
                tokens = logits.argmax(dim=-1)
            going = []
            for position, (row, token) in enumerate(zip(rows, tokens.tolist())):
                if matchers is not None:
                    matchers[row].accept_token(token)
                if token in self.stop_ids or (matchers is not None and matchers[row].is_terminated()):
                    stopped[row] = True
                else:
                    generated[row].append(token)
                    going.append(position)
            if not going:
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            step_positions = step_positions[:, -1:] + 1
            if len(going) < len(rows):
                keep = torch.tensor(going, device=device)
                cache.batch_select_indices(keep)
                mask, step_positions, tokens = mask[keep], step_positions[keep], tokens[keep]
                rows = [rows[position] for position in going]
            step_ids = tokens[:, None]
        return [(generated[row], stopped[row]) for row in range(len(ids))]

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        import torch

        # Similar lengths share a batch, so left padding wastes little.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            # a chat template already starts with BOS
            ids = [
                self.tokenizer(self._format(prompts[i]), add_special_tokens=not self.chat)["input_ids"] for i in chunk
            ]
            with torch.inference_mode():
                decoded = self._decode(ids, params)
            for (tokens, stopped), index, prompt_ids in zip(decoded, chunk, ids):
                results[index] = Completion(
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=len(tokens),
                    finish_reason="stop" if stopped else "length",
                )
        return results  # type: ignore[return-value]


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = min(len(s) for s in sequences)
    for position in range(length):
        token = sequences[0][position]
        if any(s[position] != token for s in sequences):
            return position
    return length


class VLLMEngine:
    """vLLM's offline engine on this actor's GPU (GPU clusters; not exercised on the CI machine)."""

    def __init__(self, model_path: str, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None):
        try:
            from vllm import LLM
        except ImportError:
            raise RebaseError("engine 'vllm' needs vLLM on the GPU nodes: pip install 'rebase[gpu]'") from None
        self.llm = LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
        )
        self.chat = bool(getattr(self.llm.get_tokenizer(), "chat_template", None))

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(json=params.json_schema) if params.json_schema is not None else None
        sampling = SamplingParams(
            max_tokens=params.max_new_tokens, temperature=params.temperature, structured_outputs=structured
        )
        if self.chat:
            conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
            outputs = self.llm.chat(conversations, sampling, use_tqdm=False)
        else:
            outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        return [
            Completion(
                text=o.outputs[0].text,
                prompt_tokens=len(o.prompt_token_ids or []),
                completion_tokens=len(o.outputs[0].token_ids),
                finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop",
            )
            for o in outputs
        ]


class OpenAIEngine:
    """Chat completions from an OpenAI-compatible endpoint, `concurrency` requests in flight."""

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 120.0,
        structured: bool = True,
    ):
        from openai import OpenAI

        # Local servers (vLLM, rebase serve without REBASE_API_KEY) accept any key; the SDK requires one.
        key = os.environ.get(api_key_env) or "unset"
        self.client = OpenAI(base_url=base_url, api_key=key, max_retries=max_retries, timeout=timeout)
        self.model = model
        self.concurrency = concurrency
        self.structured = structured
        self.base_url = base_url
        self.api_key_env = api_key_env

    def check(self) -> None:
        """One tiny request, so a wrong URL, key or model name is one clear error before any work starts."""
        import openai

        try:
            self.client.with_options(max_retries=1).chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "Say OK."}], max_tokens=1
            )
        except openai.AuthenticationError:
            raise RebaseError(f"{self.base_url} refused the API key from ${self.api_key_env}") from None
        except openai.NotFoundError:
            raise RebaseError(f"{self.base_url} has no model '{self.model}' (or no chat completions)") from None
        except openai.APIConnectionError:
            raise RebaseError(f"cannot reach the OpenAI-compatible endpoint {self.base_url}") from None
        except openai.APIStatusError as error:
            if error.status_code < 500 and error.status_code != 429:
                raise RebaseError(f"{self.base_url} rejected a test request: {error.status_code}") from None

    def _one(self, prompt: str, params: GenerationParams) -> Completion:
        import openai

        options = {}
        if params.json_schema is not None and self.structured:
            options["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "example", "schema": params.json_schema, "strict": True},
            }
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                **options,
            )
        except openai.APIError as error:  # retries exhausted, or a request the endpoint refuses
            status = getattr(error, "status_code", None)
            return Completion("", 0, 0, "error", error=f"{type(error).__name__}{f' {status}' if status else ''}")
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=choice.message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
        )

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda prompt: self._one(prompt, params), prompts))


def make_engine(kind: str, model: str, **options) -> Engine:
    """The engine `kind` for `model` (a local directory for transformers and vLLM, the served name for openai);
    options not meant for that engine are ignored, so one config drives all three."""
    if kind == "transformers":
        return TransformersEngine(model, **_pick(options, "batch_size", "threads", "share_prefix"))
    if kind == "vllm":
        return VLLMEngine(model, **_pick(options, "gpu_memory_utilization", "max_model_len"))
    if kind == "openai":
        return OpenAIEngine(
            model, **_pick(options, "base_url", "api_key_env", "concurrency", "max_retries", "timeout", "structured")
        )
    raise ValueError(f"unknown engine {kind}")


def _pick(options: dict, *names: str) -> dict:
    return {name: options[name] for name in names if options.get(name) is not None}
