"""Engines behind one interface: a batch of prompts in, completions out (`Engine.generate`).

- `transformers`: the CPU default and a GPU fallback; continuous batching in our own loop
  (`rebase.generate.batching`), JSON output constrained by xgrammar (the grammar library vLLM uses)
  compiled from the answer's JSON schema.
- `vllm`: GPU clusters; vLLM's offline `LLM` inside our Ray actor, structured outputs through
  `StructuredOutputsParams(json=...)`, prefix caching (every prompt of a task shares its long head). Not
  runnable on the CI machine (no GPU): what it hands vLLM is built by two pure functions,
  `vllm_llm_kwargs` and `vllm_sampling_params`, which a contract check runs against the real package.
- `openai`: any OpenAI-compatible endpoint (a vLLM server, a hosted API); a thread per request up to a
  concurrency limit; the official SDK retries 408/409/429/5xx, connection errors and timeouts with
  exponential backoff, waiting what a 429's `Retry-After` asks; with `rpm`/`tpm` every request first
  takes a slot from the pool's shared `RateLimiter` (`rebase.generate.limits`), and a 429 pauses the whole
  pool; the key comes from an environment variable, never from a file or a flag.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from rebase import precision
from rebase.errors import RebaseError
from rebase.generate.batching import ContinuousBatch, Event
from rebase.generate.limits import estimate_tokens, retry_after


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
    def generate(
        self, prompts: list[str], params: GenerationParams, on_done: Callable[[int], None] | None = None
    ) -> list[Completion]:
        """Completions in prompt order; `on_done(n)` is called as each n more prompts finish (progress)."""
        ...


def make_engine(kind: str, model: str, **options) -> Engine:
    """The engine `kind` for `model` (a local directory for transformers and vLLM, the served name for openai);
    options not meant for that engine are ignored, so one config drives all three."""
    if kind == "transformers":
        return TransformersEngine(model, **_pick(options, "batch_size", "threads", "share_prefix", "chat", "dtype"))
    if kind == "vllm":
        return VLLMEngine(model, **_pick(options, "gpu_memory_utilization", "max_model_len", "chat", "dtype"))
    if kind == "openai":
        names = ("base_url", "api_key_env", "concurrency", "max_retries", "timeout", "structured", "chat", "limiter")
        return OpenAIEngine(model, **_pick(options, *names))
    raise ValueError(f"unknown engine {kind}")


def _retryable(error) -> bool:
    """What the SDK itself retries: timeouts, dropped connections, 408, 409, 429 and 5xx."""
    import openai

    status = getattr(error, "status_code", None)
    if status is None:
        return isinstance(error, openai.APIConnectionError)  # APITimeoutError is one too
    return status in (408, 409, 429) or status >= 500


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop or [] if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _pick(options: dict, *names: str) -> dict:
    return {name: options[name] for name in names if options.get(name) is not None}


# ---------------------------------------------------------------- transformers


BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch: the base model's own rows


class TransformersEngine:
    """A Hugging Face causal LM decoding up to `batch_size` prompts per forward pass (continuous batching).
    With `adapters` (name: directory of a peft LoRA adapter trained on this model), the one base model holds
    them all, and each prompt of a batch names its adapter (`batch(..., adapters=[...])`)."""

    def __init__(
        self,
        model_path: str,
        batch_size: int = 16,
        threads: int | None = None,
        share_prefix: bool = True,
        chat: bool | None = None,
        dtype: str = "auto",
        adapters: dict[str, str] | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a weights bar per actor start only clutters job logs
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = precision.resolve(dtype, self.device)
        dtype = precision.torch_dtype(self.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.adapters = sorted(adapters or {})
        if adapters:
            self.model = _with_adapters(self.model, adapters).to(self.device).eval()
        self.model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.stop_ids.add(self.tokenizer.eos_token_id)
        self.chat = bool(self.tokenizer.chat_template) if chat is None else chat and bool(self.tokenizer.chat_template)
        self.batch_size = batch_size
        self.threads = threads
        self.share_prefix = share_prefix
        self._grammars: dict[str, Any] = {}

    def encode(self, prompt: str) -> list[int]:
        """A prompt's token ids as the engine feeds them (in the chat template when it uses one)."""
        if self.chat:
            messages = [{"role": "user", "content": prompt}]
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # a chat template already starts with BOS
        return self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"]

    def generate(
        self, prompts: list[str], params: GenerationParams, on_done: Callable[[int], None] | None = None
    ) -> list[Completion]:
        """Every prompt decoded to its end (an end token, a stop string, the grammar's end or the length)."""
        ids = [self.encode(p) for p in prompts]
        grammar = self.grammar(params.json_schema) if params.json_schema is not None else None
        decoded = ContinuousBatch(self, ids, [params] * len(ids), grammar).run(on_done)
        completions = []
        for (tokens, stopped), prompt_ids in zip(decoded, ids):
            text, at_stop = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
            finish = "stop" if stopped or at_stop else "length"
            completions.append(Completion(text, len(prompt_ids), len(tokens), finish))
        return completions

    def steps(self, ids: list[list[int]], rows: list[GenerationParams]) -> Iterator[list[Event]]:
        """Decode token ids with settings per row (length, temperature, stop strings), one step at a time:
        yields, after each forward pass, (row, token or None, finished) for the rows it advanced. A server
        streams from this; `generate` is the same loop run to the end."""
        return self.batch(ids, rows).steps()

    def batch(
        self, ids: list[list[int]], rows: list[GenerationParams], adapters: list[str] | None = None
    ) -> ContinuousBatch:
        """The continuous batch `steps` runs, for a caller that may `cancel` rows while it runs; `adapters`
        names each row's adapter (on an engine that holds adapters)."""
        return ContinuousBatch(self, ids, rows, adapters=adapters)

    def grammar(self, schema: dict):
        """The xgrammar grammar for a JSON schema, compiled once per schema."""
        import xgrammar

        key = json.dumps(schema)  # key order kept: the grammar writes properties in this order
        if key not in self._grammars:
            vocab_size = self.model.config.get_text_config().vocab_size
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(self.stop_ids)
            )
            self._grammars[key] = xgrammar.GrammarCompiler(info).compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]


def _contiguous_input(_module, args: tuple) -> tuple:
    """The LM head's input made contiguous. The last position's hidden states (`logits_to_keep=1`) are a
    strided view; on CPU in bfloat16, with the head's weight frozen (as peft leaves it), PyTorch's linear then
    runs a batched matmul that copies the 262,144 x 640 weight once per row (pytorch/pytorch#151934): 9.3 s
    instead of 0.03 s for 8 rows. The copy of a few rows' hidden states costs nothing beside it."""
    return (args[0].contiguous(), *args[1:])


def _with_adapters(model, adapters: dict[str, str]):
    """`model` holding every LoRA adapter of `adapters` (peft), none active: each forward pass names its
    rows' adapters."""
    from peft import PeftModel

    from rebase.models import building_peft_model

    names = sorted(adapters)
    with building_peft_model():
        combined = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            combined.load_adapter(adapters[name], adapter_name=name)
    return combined


# ---------------------------------------------------------------- vLLM


def vllm_llm_kwargs(model: str, **options) -> dict:
    """The keyword arguments of `vllm.LLM` for `model`, from the engine options that concern vLLM (the rest
    are ignored; unset ones are left to vLLM's defaults). Compact JSON (no free whitespace, as the
    transformers engine writes it) is an engine setting: vLLM's xgrammar backend ignores the per-request flag."""
    return {
        "model": model,
        "enable_prefix_caching": True,
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        **_pick(options, "gpu_memory_utilization", "max_model_len"),
        # our auto is vLLM's own ("auto": bfloat16 for bfloat16 checkpoints, float16 for float32 ones)
        **({"dtype": options["dtype"]} if options.get("dtype", "auto") != "auto" else {}),
    }


def vllm_sampling_params(params: GenerationParams):
    """The `vllm.SamplingParams` for our generation settings, constrained to `params.json_schema` when set."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if params.json_schema is not None:
        structured = StructuredOutputsParams(json=params.json_schema)
    return SamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        stop=params.stop,
        structured_outputs=structured,
    )


class VLLMEngine:
    """vLLM's offline engine on this actor's GPU (GPU clusters; not exercised on the CI machine)."""

    def __init__(
        self,
        model_path: str,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        chat: bool | None = None,
        dtype: str = "auto",
    ):
        try:
            from vllm import LLM
        except ImportError:
            raise RebaseError("engine 'vllm' needs vLLM on the GPU nodes: pip install 'rebase[gpu]'") from None
        options = {"gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len, "dtype": dtype}
        self.llm = LLM(**vllm_llm_kwargs(model_path, **options))
        has_template = bool(getattr(self.llm.get_tokenizer(), "chat_template", None))
        self.chat = has_template if chat is None else chat and has_template

    def generate(
        self, prompts: list[str], params: GenerationParams, on_done: Callable[[int], None] | None = None
    ) -> list[Completion]:
        """Every prompt through vLLM's scheduler in one call (it batches and caches shared prefixes itself);
        progress is reported once, at the end of the call."""
        sampling = vllm_sampling_params(params)
        if self.chat:
            conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
            outputs = self.llm.chat(conversations, sampling, use_tqdm=False)
        else:
            outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        if on_done:
            on_done(len(outputs))
        return [
            Completion(
                text=o.outputs[0].text,
                prompt_tokens=len(o.prompt_token_ids or []),
                completion_tokens=len(o.outputs[0].token_ids),
                finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop",
            )
            for o in outputs
        ]


# ---------------------------------------------------------------- OpenAI-compatible endpoints


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
        limiter: Any = None,
    ):
        from openai import DefaultHttpxClient, OpenAI

        # Local servers (vLLM, rebase serve without REBASE_API_KEY) accept any key; the SDK requires one.
        key = os.environ.get(api_key_env) or "unset"
        # `limiter`: the pool's RateLimiter actor; every answer the endpoint gives passes `_answered`, so a 429
        # pauses all the pool's actors, not only the one whose request it was. With a limiter the retries are
        # ours, so each takes a slot too; without one the SDK retries (408/409/429/5xx, honouring Retry-After).
        hooks = {"response": [self._answered]} if limiter is not None else {}
        http = DefaultHttpxClient(event_hooks=hooks) if hooks else None
        sdk_retries = 0 if limiter is not None else max_retries
        self.client = OpenAI(base_url=base_url, api_key=key, max_retries=sdk_retries, timeout=timeout, http_client=http)
        self.limiter = limiter
        self.max_retries = max_retries
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

    def generate(
        self, prompts: list[str], params: GenerationParams, on_done: Callable[[int], None] | None = None
    ) -> list[Completion]:
        """One request per prompt, `concurrency` at a time; a request that fails for good is an error completion."""

        def one(prompt: str) -> Completion:
            completion = self._one(prompt, params)
            if on_done:
                on_done(1)
            return completion

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, prompts))

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
        estimated = estimate_tokens(prompt, params.max_new_tokens)
        for attempt in range(self.max_retries + 1):
            if self.limiter is not None:
                self._wait_for_slot(estimated)
            try:
                response = self._request(
                    self.client, prompt, max_tokens=params.max_new_tokens, temperature=params.temperature, **options
                )
                break
            except openai.APIError as error:  # retries exhausted, or a request the endpoint refuses
                if self.limiter is None or attempt == self.max_retries or not _retryable(error):
                    status = getattr(error, "status_code", None)
                    why = f"{type(error).__name__}{f' {status}' if status else ''}"
                    return Completion("", 0, 0, "error", error=why)
                refused = getattr(error, "response", None)
                if refused is None or retry_after(refused.headers) is None:  # else the pool is paused already
                    time.sleep(min(8.0, 0.5 * 2**attempt))
        choice = response.choices[0]
        usage = response.usage
        if self.limiter is not None and usage:
            self.limiter.settle.remote(estimated, usage.prompt_tokens + usage.completion_tokens)
        return Completion(
            text=(choice.message.content if self.chat else choice.text) or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
        )

    def _wait_for_slot(self, tokens: int) -> None:
        """Take a slot from the pool's rate limiter and wait for it (again, if a 429 paused the pool meanwhile)."""
        import ray

        wait, pauses = ray.get(self.limiter.reserve.remote(tokens))
        while True:
            time.sleep(wait)
            wait, pauses = ray.get(self.limiter.confirm.remote(tokens, pauses))
            if wait == 0.0:
                return

    def _answered(self, response) -> None:
        """httpx's response hook: a 429 or 503 with `Retry-After` pauses the pool's every actor that long."""
        if response.status_code in (429, 503):
            seconds = retry_after(response.headers)
            if seconds is not None:
                self.limiter.pause.remote(seconds)

    @property
    def _route(self) -> str:
        return "chat completions" if self.chat else "completions"

    def _request(self, client, prompt: str, **options):
        if self.chat:
            return client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], **options
            )
        return client.completions.create(model=self.model, prompt=prompt, **options)
