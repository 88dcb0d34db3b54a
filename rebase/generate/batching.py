"""The transformers engine's decode loop: continuous batching over a KV cache laid out by hand.

At most `batch_size` rows run at once. A row that stops leaves the batch (and its cache rows) at once and
waiting prompts are prefilled into the free places, so the batch stays full instead of idling while a few
long answers finish (what `model.generate` does with a batch).

Cache layout: rows are left-padded to a common length. A newly admitted group is prefilled on its own and
merged by padding the shorter side's cache on the left, inside sliding windows too: windowed layers keep
the last `window - 1` positions, so padding stays aligned with the attention mask. The prompts of one task
share their head (instruction and examples): its KV is computed once and laid out behind each row's
padding, so prefill computes only what differs, as vLLM's prefix caching does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rebase.generate.engines import GenerationParams, TransformersEngine

Event = tuple[int, int | None, bool]  # (prompt number, token or None, finished)

SHARED_PREFIX_MIN = 32  # tokens: shorter shared heads are cheaper to recompute than to copy per row
TRIM_SLACK = 32  # leading all-padding positions tolerated before the cache is cut


@dataclass
class _Running:
    """The rows in the batch (prompt numbers, by batch position) and what the next forward pass reads."""

    rows: list[int] = field(default_factory=list)
    cache: Any = None  # a transformers DynamicCache with one batch row per running row
    mask: Any = None  # (rows, positions) attention mask; 0 on left padding
    positions: Any = None  # (rows, 1) position id of each row's last token
    tokens: Any = None  # (rows,) each row's last chosen token: the next step's input


class ContinuousBatch:
    """Decodes token ids with settings per row (`rows`: length, temperature, stop strings); greedy unless a
    row's temperature > 0; with `grammar` (compiled by xgrammar), each row's matcher masks its logits. On an
    engine that holds LoRA adapters, `adapters` names each row's adapter (`BASE_ADAPTER`: none): rows of
    different adapters share every forward pass (peft's mixed batches)."""

    def __init__(
        self,
        engine: TransformersEngine,
        ids: list[list[int]],
        rows: list[GenerationParams],
        grammar: Any = None,
        adapters: list[str] | None = None,
    ):
        self.engine, self.model, self.ids, self.rows = engine, engine.model, ids, rows
        self.adapters = adapters if engine.adapters else None
        self.device = engine.device
        self.pad = engine.tokenizer.pad_token_id
        self.generated: list[list[int]] = [[] for _ in ids]
        self.stopped = [False] * len(ids)
        self.events: list[Event] = []
        self.matchers = None
        if grammar is not None:
            import xgrammar

            self.matchers = [xgrammar.GrammarMatcher(grammar) for _ in ids]
            self.batch_matcher = xgrammar.BatchGrammarMatcher(max_threads=engine.threads or "auto")
            self.bitmask = xgrammar.allocate_token_bitmask(engine.batch_size, grammar.tokenizer_info.vocab_size)
        # a shared prefix is computed once, so with one adapter: rows of several cannot share it
        one_adapter = self.adapters is None or len(set(self.adapters)) == 1
        self.prefix = self._shared_prefix() if engine.share_prefix and one_adapter else []
        self._prefix_cache = None
        self.running = _Running()
        self.cancelled: set[int] = set()  # rows nobody waits for any more: dropped before the next step

    def cancel(self, row: int) -> None:
        """Stop decoding `row` (its caller went away): it leaves the batch before the next forward pass."""
        self.cancelled.add(row)

    def _shared_prefix(self) -> list[int]:
        """The head every prompt shares, when long enough to be worth sharing and short enough to fit in a
        sliding window (each row still computes at least its last token)."""
        if len(self.ids) < 2:
            return []
        window = getattr(self.model.config.get_text_config(), "sliding_window", None)
        shared = min(common_prefix_length(self.ids), min(len(x) for x in self.ids) - 1)
        usable = shared >= SHARED_PREFIX_MIN and (window is None or shared < window)
        return self.ids[0][:shared] if usable else []

    def run(self, on_done: Callable[[int], None] | None = None) -> list[tuple[list[int], bool]]:
        """Every row's generated tokens and whether it stopped (rather than ran out of length);
        `on_done(n)` after each step in which n rows finished."""
        for events in self.steps():
            finished = sum(1 for _, _, done in events if done)
            if finished and on_done:
                on_done(finished)
        return list(zip(self.generated, self.stopped))

    def steps(self) -> Iterator[list[Event]]:
        """One forward pass per step: a prefill of waiting prompts when there is room, else a decode of the
        running rows; yields the events of the rows it advanced, at most one per row (a prompt's first token
        comes from its prefill, its second from the next decode). Inference mode is entered per step: a
        caller may run each step on another thread."""
        import torch

        waiting = list(range(len(self.ids)))[::-1]  # popped from the end: prompt order
        self.running = _Running()
        while waiting or self.running.rows:
            if self.cancelled:
                waiting[:] = [row for row in waiting if row not in self.cancelled]
                self._drop_cancelled()
                if not (waiting or self.running.rows):
                    break
            with torch.inference_mode():
                # Admit as soon as a place is free: prefill costs the same per token in small groups or large.
                admitting = bool(waiting) and len(self.running.rows) < self.engine.batch_size
                if admitting:
                    self._admit(waiting)
                elif self.running.rows:
                    self._decode()
            events, self.events = self.events, []
            yield events

    def _drop_cancelled(self) -> None:
        running = self.running
        if not running.rows or not self.cancelled & set(running.rows):
            return
        going = [n for n, row in enumerate(running.rows) if row not in self.cancelled]
        if not going:
            self.running = _Running()
            return
        running = _select(running, going, self.device)
        running.cache, running.mask = trim(running.cache, running.mask)
        self.running = running

    def _admit(self, waiting: list[int]) -> None:
        """Prefill as many waiting prompts as there are free places and join those that go on to the batch."""
        free = self.engine.batch_size - len(self.running.rows)
        if not waiting or not free:
            return
        group = [waiting.pop() for _ in range(min(free, len(waiting)))]
        cache, mask, positions, logits = self._prefill(group)
        tokens, going = self._choose(logits, group)
        admitted = _select(_Running(group, cache, mask, positions, tokens), going, self.device)
        if admitted.rows and self.running.rows:
            self.running = _joined(self.running, admitted)
        elif admitted.rows:
            self.running = admitted

    def _decode(self) -> None:
        """One token for every running row; rows that finish leave the batch."""
        import torch

        running = self.running
        mask = torch.cat([running.mask, running.mask.new_ones(len(running.rows), 1)], dim=1)
        positions = running.positions + 1
        output = self.model(
            input_ids=running.tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=running.cache,
            use_cache=True,
            **self._adapter_names(running.rows),
        )
        tokens, going = self._choose(output.logits[:, -1, :], running.rows)
        running = _Running(running.rows, output.cache, mask, positions, tokens)
        if len(going) < len(running.rows):
            running = _select(running, going, self.device)
            if running.rows:
                running.cache, running.mask = trim(running.cache, running.mask)
        self.running = running

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
            **self._adapter_names(group),
        )
        return output.cache, mask, positions[:, -1:], output.logits[:, -1, :]

    def _laid_out_prefix(self, pads: list[int]):
        """The shared prefix's cache for rows padded by `pads`: row r holds min(pad, L) empty places, then
        the first L - pad prefix positions (the rest of its prefix is computed with its own tokens)."""
        import copy

        import torch

        if self._prefix_cache is None:
            prefix = torch.tensor([self.prefix], device=self.device)
            self._prefix_cache = self.model(
                input_ids=prefix, use_cache=True, logits_to_keep=1, **self._adapter_names([0])
            ).cache
        cache = copy.deepcopy(self._prefix_cache)
        length = len(self.prefix)
        empty = [min(p, length) for p in pads]
        for layer in cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                parts = [torch.cat([_zeros(tensor, e), tensor[:, :, : length - e]], 2) for e in empty]
                setattr(layer, name, torch.cat(parts))
        return cache

    def _adapter_names(self, rows: list[int]) -> dict:
        """The forward pass's `adapter_names` (peft: one per batch row) for these rows; none without adapters."""
        return {} if self.adapters is None else {"adapter_names": [self.adapters[row] for row in rows]}

    def _choose(self, logits, rows: list[int]):
        """Next tokens for the batch positions holding `rows`, recorded; and the positions still going."""
        tokens = self._next_tokens(logits.float(), rows)
        going = [
            position for position, (row, token) in enumerate(zip(rows, tokens.tolist())) if self._record(row, token)
        ]
        return tokens, going

    def _next_tokens(self, logits, rows: list[int]):
        """Greedy (or sampled at the row's temperature) tokens, within each row's grammar when there is one."""
        import torch

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
        return tokens

    def _record(self, row: int, token: int) -> bool:
        """Adds `token` to the row (an end token or a finished grammar ends it unadded); its event; whether
        the row goes on."""
        if self.matchers is not None:
            self.matchers[row].accept_token(token)
        if token in self.engine.stop_ids or (self.matchers is not None and self.matchers[row].is_terminated()):
            self.stopped[row] = True
            self.events.append((row, None, True))
            return False
        self.generated[row].append(token)
        if self._at_stop_string(row):
            self.stopped[row] = True
            self.events.append((row, token, True))
            return False
        going = len(self.generated[row]) < self.rows[row].max_new_tokens
        self.events.append((row, token, not going))
        return going

    def _at_stop_string(self, row: int) -> bool:
        """True when the row's text now contains a stop string (only its last few tokens are decoded)."""
        stop = self.rows[row].stop
        if not stop:
            return False
        tail = self.engine.tokenizer.decode(self.generated[row][-12:], skip_special_tokens=True)
        return any(piece in tail for piece in stop)


def _select(running: _Running, going: list[int], device) -> _Running:
    """The batch reduced to the positions in `going` (the cache is reduced in place)."""
    import torch

    keep = torch.tensor(going, device=device, dtype=torch.long)
    running.cache.batch_select_indices(keep)
    rows = [running.rows[n] for n in going]
    return _Running(rows, running.cache, running.mask[keep], running.positions[keep], running.tokens[keep])


def _joined(running: _Running, admitted: _Running) -> _Running:
    """One batch of the running rows followed by the admitted ones (merged into the running cache)."""
    import torch

    cache, mask = merge(running.cache, running.mask, admitted.cache, admitted.mask)
    positions = torch.cat([running.positions, admitted.positions])
    tokens = torch.cat([running.tokens, admitted.tokens])
    return _Running(running.rows + admitted.rows, cache, mask, positions, tokens)


# ---------------------------------------------------------------- cache layout


def _zeros(tensor, length: int):
    return tensor.new_zeros(tensor.shape[0], tensor.shape[1], length, tensor.shape[3])


def pad_left(tensor, length: int):
    """A (batch, heads, positions, dim) cache tensor padded with zeros on the left to `length` positions."""
    import torch

    missing = length - tensor.shape[2]
    return tensor if missing <= 0 else torch.cat([_zeros(tensor, missing), tensor], 2)


def kept_positions(layer, total: int) -> int:
    """How many positions a cache layer holds once the sequence is `total` long, recorded on the layer:
    sliding-window layers keep at most `window - 1` (and count every position seen), full layers all."""
    window = getattr(layer, "sliding_window", None)
    if not window:
        return total
    layer.cumulative_length = total
    return min(total, window - 1)


def trim(cache, mask, slack: int = TRIM_SLACK):
    """Drop the leading positions that are padding for every row (they pile up as rows come and go), once
    there are at least `slack` of them."""
    first = int(mask.any(dim=0).nonzero()[0])
    if first < slack:
        return cache, mask
    total = mask.shape[1] - first
    for layer in cache.layers:
        keep = kept_positions(layer, total)
        for name in ("keys", "values"):
            setattr(layer, name, getattr(layer, name)[:, :, -keep:])
    return cache, mask[:, first:]


def merge(cache, mask, other, other_mask):
    """One batch from two: caches and masks padded on the left to the longer, then stacked (into `cache`)."""
    import torch

    total = max(mask.shape[1], other_mask.shape[1])
    for layer, extra in zip(cache.layers, other.layers):
        length = kept_positions(layer, total)
        for name in ("keys", "values"):
            merged = torch.cat([pad_left(getattr(layer, name), length), pad_left(getattr(extra, name), length)])
            setattr(layer, name, merged)
    masks = [torch.cat([m.new_zeros(m.shape[0], total - m.shape[1]), m], 1) for m in (mask, other_mask)]
    return cache, torch.cat(masks)


def common_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all sequences share."""
    length = min(len(s) for s in sequences)
    for position in range(length):
        token = sequences[0][position]
        if any(s[position] != token for s in sequences):
            return position
    return length
