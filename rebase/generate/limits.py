"""Rate limits for hosted teachers: requests and tokens per minute, shared by every actor of a pool.

A hosted endpoint limits requests per minute (`rpm`) and tokens per minute (`tpm`, prompt plus
`max_tokens`, as OpenAI counts them before a request runs). One `RateLimiter` (a Ray actor with no CPU)
serves all the pool's actors: each request reserves its slot before it is sent and waits until then, so
the limits hold for the pool as a whole however many actors the pool scales to. Slots are paced evenly
(no burst) at `HEADROOM` (97%) of the limits: with `rpm` 60 a request leaves every 1.03 s.
A request waits for its slot, then confirms it: a pause asked for meanwhile voids the slot.
A request's tokens are estimated before it goes (`estimate_tokens`) and settled with the usage the
endpoint reports. A 429 answer's `Retry-After` pauses every actor (the SDK retries that request after it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

CHARS_PER_TOKEN = 4  # a prompt's tokens estimated from its length, where no tokenizer of the model is at hand
# Slots are paced at this share of the limits: arrival times jitter by milliseconds and a prompt's tokens are
# only estimated until the endpoint reports them, and paced at 100% the endpoint saw 1.003-1.017x the setting
# (benchmarks/rate_limit.py, RESULTS.md)
HEADROOM = 0.97


def estimate_tokens(prompt: str, max_tokens: int) -> int:
    """The tokens a request may use, as a limit counts them before it runs: the prompt's, estimated, plus
    the most it may generate."""
    return len(prompt) // CHARS_PER_TOKEN + 1 + max_tokens


class RateLimiter:
    """Slots for requests under `rpm` requests and `tpm` tokens per minute (None: no limit of that kind)."""

    def __init__(self, rpm: int | None, tpm: int | None, clock: Callable[[], float] = time.monotonic):
        self.request_seconds = 60.0 / (rpm * HEADROOM) if rpm else 0.0
        self.token_seconds = 60.0 / (tpm * HEADROOM) if tpm else 0.0
        self.clock = clock
        self.next_request = self.next_tokens = self.paused_until = float("-inf")
        self.waited = 0.0
        self.requests = 0
        self.pauses = 0

    def reserve(self, tokens: int) -> tuple[float, int]:
        """Reserve the next slot for a request of `tokens` tokens: the seconds to wait before it, and the
        pauses so far, to hand back to `confirm` when the slot comes."""
        now = self.clock()
        start = max(now, self.next_request, self.next_tokens, self.paused_until)
        self.next_request = start + self.request_seconds
        self.next_tokens = start + tokens * self.token_seconds
        self.waited += start - now
        return start - now, self.pauses

    def confirm(self, tokens: int, pauses: int) -> tuple[float, int]:
        """A reserved slot has come: (0, pauses) to send now; but if the endpoint asked for a pause since the
        slot was reserved, the slot is void and a new one is reserved after the pause (wait, pauses)."""
        if pauses == self.pauses and self.clock() >= self.paused_until:
            self.requests += 1
            return 0.0, pauses
        return self.reserve(tokens)

    def settle(self, estimated: int, used: int) -> None:
        """A request used `used` tokens of the `estimated` it reserved: the difference goes back (or is owed)."""
        self.next_tokens -= (estimated - used) * self.token_seconds

    def pause(self, seconds: float) -> None:
        """The endpoint asked to wait (`Retry-After`): no slot starts sooner than `seconds` from now."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)
        self.pauses += 1

    def report(self) -> dict:
        return {"requests": self.requests, "waited_seconds": round(self.waited, 2), "retry_after_pauses": self.pauses}


def retry_after(headers) -> float | None:
    """Seconds a 429 or 503 answer asks to wait: `retry-after-ms`, or `retry-after` in seconds (dates are left
    to the SDK, which honours them for its own retry)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if 0 < seconds <= 600:
            return seconds
    return None
