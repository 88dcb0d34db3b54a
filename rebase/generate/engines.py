"""Teacher engines behind one interface: a batch of prompts in, completions out.

- `transformers`: the CPU default and a GPU fallback; continuous batching in our own loop, JSON output
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
    stop: list[str] | None = None  # end an answer at the first of these strings (not included)


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
    """A Hugging Face causal LM decoding up to `batch_size` prompts per forward pass (continuous batching)."""

    def __init__(
        self,
        model_path: str,
        batch_size: int = 16,
        threads: int | None = None,
        share_prefix: bool = True,
        chat: bool | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a weights bar per actor start only clutters job logs
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
        self.chat = bool(self.tokenizer.chat_template) if chat is None else chat and bool(self.tokenizer.chat_template)
        self.batch_size = batch_size
        self.threads = threads
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

    def encode(self, prompt: str) -> list[int]:
        """A prompt's token ids as the engine feeds them (in the chat template when it uses one)."""
        # a chat template already starts with BOS
        return self.tokenizer(self._format(prompt), add_special_tokens=not self.chat)["input_ids"]

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        ids = [self.encode(p) for p in prompts]
        decoded = _ContinuousBatch(self, ids, params).run()
        completions = []
        for (tokens, stopped), prompt_ids in zip(decoded, ids):
            text, at_stop = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
            finish = "stop" if stopped or at_stop else "length"
            completions.append(Completion(text, len(prompt_ids), len(tokens), finish))
        return completions

    def steps(self, ids: list[list[int]], rows: list[GenerationParams]):
        """Decode token ids with settings per row (length, temperature, stop strings), one step at a time:
        yields, after each forward pass, (row, token or None, finished) for the rows it advanced. A server
        streams from this; `generate` is the same loop run to the end."""
        return _ContinuousBatch(self, ids, GenerationParams(), rows).steps()


class _ContinuousBatch:
    """Decodes many prompts with at most `engine.batch_size` rows running at once. A row that stops leaves
    the batch (and its KV cache rows) at once and waiting prompts are prefilled into the free places, so
    the batch stays full instead of idling while a few long answers finish (what `generate` does).

    Rows are left-padded to a common cache length; a newly admitted group is prefilled on its own and
    merged by padding the shorter side's cache on the left (inside sliding windows too: the windowed
    layers keep the last `window - 1` positions, so padding stays aligned with the attention mask). The
    prompts of one task share their head (instruction and examples): its KV is computed once and laid
    out behind each row's padding, so prefill only computes what differs, as vLLM's prefix caching does.
    Greedy unless a row's temperature > 0; with a schema, each row's xgrammar matcher masks its logits.
    `rows` gives each row its own length, temperature and stop strings (default: `params` for all).
    """

    def __init__(
        self,
        engine: TransformersEngine,
        ids: list[list[int]],
        params: GenerationParams,
        rows: list[GenerationParams] | None = None,
    ):
        self.engine, self.model, self.ids, self.params = engine, engine.model, ids, params
        self.rows = rows or [params] * len(ids)
        self.events: list[tuple[int, int | None, bool]] = []
        self.device = engine.device
        self.pad = engine.tokenizer.pad_token_id
        self.generated: list[list[int]] = [[] for _ in ids]
        self.stopped = [False] * len(ids)
        self.matchers = self.bitmask = None
        if params.json_schema is not None:
            import xgrammar

            grammar = engine._grammar(params.json_schema)
            self.matchers = [xgrammar.GrammarMatcher(grammar) for _ in ids]
            self.batch_matcher = xgrammar.BatchGrammarMatcher(max_threads=engine.threads or "auto")
            self.bitmask = xgrammar.allocate_token_bitmask(engine.batch_size, grammar.tokenizer_info.vocab_size)
        window = getattr(self.model.config.get_text_config(), "sliding_window", None)
        shared = min(_common_prefix_length(ids), min(len(x) for x in ids) - 1)  # each row computes a token
        usable = engine.share_prefix and len(ids) > 1 and shared >= 32 and (window is None or shared < window)
        self.prefix = ids[0][:shared] if usable else []
        self._prefix_cache = None

    def run(self) -> list[tuple[list[int], bool]]:
        """Every row's generated tokens and whether it stopped (rather than ran out of length)."""
        for _ in self.steps():
            pass
        return list(zip(self.generated, self.stopped))

    def steps(self):
        """One forward pass per step (admitting waiting prompts first when there is room); yields the
        events of the rows it advanced. Inference mode is entered per step: a caller may run each step on
        another thread."""
        import torch

        waiting = list(range(len(self.ids)))[::-1]  # popped from the end: prompt order
        self.state = {"rows": [], "cache": None, "mask": None, "positions": None, "tokens": None}
        while waiting or self.state["rows"]:
            with torch.inference_mode():
                self._step(waiting)
            events, self.events = self.events, []
            yield events

    def _step(self, waiting: list[int]) -> None:
        import torch

        state = self.state
        rows, cache, mask = state["rows"], state["cache"], state["mask"]
        positions, tokens = state["positions"], state["tokens"]
        free = self.engine.batch_size - len(rows)
        # Admit as soon as a place is free: prefill costs the same per token in small groups or large.
        if waiting and free:
            group = [waiting.pop() for _ in range(min(free, len(waiting)))]
            group_cache, group_mask, group_positions, logits = self._prefill(group)
            group_tokens, going = self._choose(logits, group)
            keep = torch.tensor(going, device=self.device, dtype=torch.long)
            group_cache.batch_select_indices(keep)
            group = [group[n] for n in going]
            group_mask, group_positions, group_tokens = group_mask[keep], group_positions[keep], group_tokens[keep]
            if group and rows:
                cache, mask = _merge(cache, mask, group_cache, group_mask)
                positions = torch.cat([positions, group_positions])
                tokens = torch.cat([tokens, group_tokens])
            elif group:
                cache, mask, positions, tokens = group_cache, group_mask, group_positions, group_tokens
            rows = rows + group
        if rows:
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions + 1
            output = self.model(
                input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
            )
            cache = output.cache
            tokens, going = self._choose(output.logits[:, -1, :], rows)
            if len(going) < len(rows):
                keep = torch.tensor(going, device=self.device, dtype=torch.long)
                cache.batch_select_indices(keep)
                mask, positions, tokens = mask[keep], positions[keep], tokens[keep]
                rows = [rows[n] for n in going]
                if rows:
                    cache, mask = _trim(cache, mask)
        self.state = {"rows": rows, "cache": cache, "mask": mask, "positions": positions, "tokens": tokens}

    def _prefill(self, group: list[int]):
        """Cache, mask, last positions and next-token logits of a group of new prompts, left-padded."""
        import torch

        ids = [self.ids[n] for n in group]
        width = max(len(x) for x in ids)
        pads = [width - len(x) for x in ids]
        input_ids = torch.tensor([[self.pad] * p + x for p, x in zip(pads, ids)], device=self.device)
        mask = torch.tensor([[0] * p + [1] * len(x) for p, x in zip(pads, ids)], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, start = None, 0
        if self.prefix:
            cache, start = self._laid_out_prefix(pads), len(self.prefix)
        output = self.model(
            input_ids=input_ids[:, start:],
            attention_mask=mask,
            position_ids=positions[:, start:],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.cache, mask, positions[:, -1:], output.logits[:, -1, :]

    def _laid_out_prefix(self, pads: list[int]):
        """The shared prefix's cache for rows padded by `pads`: row r holds min(pad, L) empty places, then
        the first L - pad prefix positions (the rest of its prefix is computed with its own tokens)."""
        import copy

        import torch

        if self._prefix_cache is None:
            prefix = torch.tensor([self.prefix], device=self.device)
            self._prefix_cache = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache
        cache = copy.deepcopy(self._prefix_cache)
        length = len(self.prefix)
        empty = [min(p, length) for p in pads]
        for layer in cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                parts = [torch.cat([_zeros(tensor, e), tensor[:, :, : length - e]], 2) for e in empty]
                setattr(layer, name, torch.cat(parts))
        return cache

    def _choose(self, logits, rows: list[int]):
        """Next tokens for the batch positions holding `rows`; records them; the positions still going."""
        import torch

        logits = logits.float()
        if self.matchers is not None:
            import xgrammar

            self.batch_matcher.batch_fill_next_token_bitmask([self.matchers[row] for row in rows], self.bitmask)
            xgrammar.apply_token_bitmask_inplace(logits, self.bitmask[: len(rows)].to(logits.device))
        tokens = logits.argmax(dim=-1)
        temperatures = [self.rows[row].temperature for row in rows]
        if any(t > 0 for t in temperatures):
            scale = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=logits.device)[:, None]
            sampled = torch.multinomial(torch.softmax(logits / scale, dim=-1), 1)[:, 0]
            greedy = torch.tensor([t == 0 for t in temperatures], device=logits.device)
            tokens = torch.where(greedy, tokens, sampled)
        going = []
        for position, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if self.matchers is not None:
                self.matchers[row].accept_token(token)
            if token in self.engine.stop_ids or (self.matchers is not None and self.matchers[row].is_terminated()):
                self.stopped[row] = True
                self.events.append((row, None, True))
                continue
            self.generated[row].append(token)
            if self._at_stop_string(row):
                self.stopped[row] = True
                self.events.append((row, token, True))
                continue
            going_on = len(self.generated[row]) < self.rows[row].max_new_tokens
            self.events.append((row, token, not going_on))
            if going_on:
                going.append(position)
        return tokens, going

    def _at_stop_string(self, row: int) -> bool:
        """True when the row's text now contains a stop string (only its last few tokens are decoded)."""
        stop = self.rows[row].stop
        if not stop:
            return False
        tail = self.engine.tokenizer.decode(self.generated[row][-12:], skip_special_tokens=True)
        return any(piece in tail for piece in stop)


def _zeros(tensor, length: int):
    return tensor.new_zeros(tensor.shape[0], tensor.shape[1], length, tensor.shape[3])


def _pad_left(tensor, length: int):
    """A (batch, heads, positions, dim) cache tensor padded on the left to `length` positions."""
    import torch

    missing = length - tensor.shape[2]
    return tensor if missing <= 0 else torch.cat([_zeros(tensor, missing), tensor], 2)


def _kept_positions(layer, total: int) -> int:
    """How many positions a cache layer holds once the sequence is `total` long, recorded on the layer:
    sliding-window layers keep at most `window - 1` (and count every position seen), full layers all."""
    window = getattr(layer, "sliding_window", None)
    if not window:
        return total
    layer.cumulative_length = total
    return min(total, window - 1)


def _trim(cache, mask, slack: int = 32):
    """Drop the leading positions that are padding for every row (they pile up as rows come and go)."""
    first = int(mask.any(dim=0).nonzero()[0])
    if first < slack:
        return cache, mask
    total = mask.shape[1] - first
    for layer in cache.layers:
        keep = _kept_positions(layer, total)
        for name in ("keys", "values"):
            setattr(layer, name, getattr(layer, name)[:, :, -keep:])
    return cache, mask[:, first:]


def _merge(cache, mask, other, other_mask):
    """One batch from two: caches and masks padded on the left to the longer, then stacked."""
    import torch

    total = max(mask.shape[1], other_mask.shape[1])
    for layer, extra in zip(cache.layers, other.layers):
        length = _kept_positions(layer, total)
        for name in ("keys", "values"):
            merged = torch.cat([_pad_left(getattr(layer, name), length), _pad_left(getattr(extra, name), length)])
            setattr(layer, name, merged)
    masks = [torch.cat([m.new_zeros(m.shape[0], total - m.shape[1]), m], 1) for m in (mask, other_mask)]
    return cache, torch.cat(masks)


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = min(len(s) for s in sequences)
    for position in range(length):
        token = sequences[0][position]
        if any(s[position] != token for s in sequences):
            return position
    return length


class VLLMEngine:
    """vLLM's offline engine on this actor's GPU (GPU clusters; not exercised on the CI machine)."""

    def __init__(
        self,
        model_path: str,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        chat: bool | None = None,
    ):
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
        has_template = bool(getattr(self.llm.get_tokenizer(), "chat_template", None))
        self.chat = has_template if chat is None else chat and has_template

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(json=params.json_schema) if params.json_schema is not None else None
        sampling = SamplingParams(
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            structured_outputs=structured,
            stop=params.stop,
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
        chat: bool | None = None,
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
        self.chat = chat is not False  # chat completions unless told to send raw prompts (completions)

    def check(self) -> None:
        """One tiny request, so a wrong URL, key or model name is one clear error before any work starts."""
        import openai

        try:
            self._request(self.client.with_options(max_retries=1), "Say OK.", max_tokens=1)
        except openai.AuthenticationError:
            raise RebaseError(f"{self.base_url} refused the API key from ${self.api_key_env}") from None
        except openai.NotFoundError:
            raise RebaseError(f"{self.base_url} has no model '{self.model}' (or no {self._route})") from None
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
        if params.stop:
            options["stop"] = params.stop
        try:
            response = self._request(
                self.client, prompt, max_tokens=params.max_new_tokens, temperature=params.temperature, **options
            )
        except openai.APIError as error:  # retries exhausted, or a request the endpoint refuses
            status = getattr(error, "status_code", None)
            return Completion("", 0, 0, "error", error=f"{type(error).__name__}{f' {status}' if status else ''}")
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=(choice.message.content if self.chat else choice.text) or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
        )

    @property
    def _route(self) -> str:
        return "chat completions" if self.chat else "completions"

    def _request(self, client, prompt: str, **options):
        if self.chat:
            return client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], **options
            )
        return client.completions.create(model=self.model, prompt=prompt, **options)

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda prompt: self._one(prompt, params), prompts))


def make_engine(kind: str, model: str, **options) -> Engine:
    """The engine `kind` for `model` (a local directory for transformers and vLLM, the served name for openai);
    options not meant for that engine are ignored, so one config drives all three."""
    if kind == "transformers":
        return TransformersEngine(model, **_pick(options, "batch_size", "threads", "share_prefix", "chat"))
    if kind == "vllm":
        return VLLMEngine(model, **_pick(options, "gpu_memory_utilization", "max_model_len", "chat"))
    if kind == "openai":
        names = ("base_url", "api_key_env", "concurrency", "max_retries", "timeout", "structured", "chat")
        return OpenAIEngine(model, **_pick(options, *names))
    raise ValueError(f"unknown engine {kind}")


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop or [] if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _pick(options: dict, *names: str) -> dict:
    return {name: options[name] for name in names if options.get(name) is not None}
