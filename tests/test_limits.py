"""The hosted teacher's rate limiter (rebase/generate/limits.py) on a clock the test moves: slots paced
evenly under requests and tokens per minute, tokens settled with what was used, Retry-After pausing every
request; the same limits against a real HTTP server on loopback are in tests/test_transform.py."""

from __future__ import annotations

import pytest

from rebase.generate import limits
from rebase.generate.limits import RateLimiter, estimate_tokens, retry_after


@pytest.fixture(autouse=True)
def _exact_pacing(monkeypatch):
    """The pacing arithmetic on round numbers: the limits themselves, without the headroom."""
    monkeypatch.setattr(limits, "HEADROOM", 1.0)


def test_slots_keep_a_headroom_under_the_limits(monkeypatch):
    monkeypatch.setattr(limits, "HEADROOM", 0.97)
    limiter = RateLimiter(rpm=60, tpm=None, clock=Clock())
    assert limiter.reserve(1)[0] == 0.0 and limiter.reserve(1)[0] == pytest.approx(60 / 58.2)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_are_paced_evenly():
    clock = Clock()
    limiter = RateLimiter(rpm=60, tpm=None, clock=clock)
    assert [limiter.reserve(10)[0] for _ in range(4)] == [0.0, 1.0, 2.0, 3.0]  # one a second, reserved ahead
    clock.now += 10  # idle: no debt, and no burst saved up either
    assert limiter.reserve(10)[0] == 0.0 and limiter.reserve(10)[0] == 1.0
    assert limiter.confirm(10, 0) == (0.0, 0)  # counted when sent
    assert limiter.report() == {"requests": 1, "waited_seconds": 7.0, "retry_after_pauses": 0}


def test_tokens_per_minute_pace_by_size_and_are_settled_with_usage():
    clock = Clock()
    limiter = RateLimiter(rpm=None, tpm=600, clock=clock)  # 10 tokens a second
    assert limiter.reserve(100)[0] == 0.0
    assert limiter.reserve(50)[0] == pytest.approx(10.0)  # waits out the first request's 100 tokens
    limiter.settle(50, 20)  # the second used 20 of the 50 it reserved: 3 s come back
    assert limiter.reserve(10)[0] == pytest.approx(12.0)
    limiter.settle(10, 40)  # and one that used more than it reserved is owed
    assert limiter.reserve(1)[0] == pytest.approx(16.0)


def test_both_limits_the_stricter_wins():
    clock = Clock()
    limiter = RateLimiter(rpm=120, tpm=6000, clock=clock)  # 0.5 s a request, 100 tokens a second
    assert limiter.reserve(10)[0] == 0.0 and limiter.reserve(10)[0] == 0.5  # small requests: rpm decides
    assert limiter.reserve(1000)[0] == 1.0 and limiter.reserve(10)[0] == pytest.approx(11.0)  # a big one: tpm


def test_retry_after_pauses_every_later_slot():
    clock = Clock()
    limiter = RateLimiter(rpm=600, tpm=None, clock=clock)
    early = limiter.reserve(1)  # reserved before the 429 came
    limiter.pause(5.0)
    assert limiter.reserve(1)[0] == 5.0 and limiter.reserve(1)[0] == pytest.approx(5.1)
    limiter.pause(1.0)  # a shorter pause never shortens a longer one
    assert limiter.reserve(1)[0] == pytest.approx(5.2)
    # the early slot comes, but a pause came after it was reserved: void, and a new slot after the pause
    assert limiter.confirm(1, early[1]) == (pytest.approx(5.3), 2)
    clock.now += 5.3
    assert limiter.confirm(1, 2) == (0.0, 2)
    assert limiter.report()["retry_after_pauses"] == 2 and limiter.report()["requests"] == 1


def test_retry_after_headers_and_estimates():
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None  # dates: the SDK's own
    assert retry_after({"retry-after": "0"}) is None and retry_after({}) is None
    assert estimate_tokens("x" * 400, 50) == 151
