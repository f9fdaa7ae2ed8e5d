"""Messages of a loss-based TCP (reno; CUBIC runs Reno-friendly at these windows) over a lossy path, and what a
collective round that waits for the slowest of its messages pays for them.

A textbook AIMD sender, round trip by round trip (no fitted constant): a round sends min(cwnd, segments left),
each segment lost independently with probability p. Slow start doubles cwnd up to ssthresh, congestion avoidance
adds one segment per loss-free round, and only while the round filled the window (Linux does not grow an
application-limited window). A round with a loss halves cwnd (ssthresh = cwnd / 2, at least 2) and resends what was
lost in the rounds after it; when fewer than three segments followed the first loss in its round, no duplicate ACKs
can signal it and the tail-loss probe does, two round trips later, plus the 200 ms worst-case delayed ACK when it
was the only segment in flight (RFC 8985). The window carries over from message to message on a connection; the
first messages (from the initial window) are left out, so the times are the connection's steady state.

A ring round or a direct exchange completes with its slowest message: of ``parallel`` independent messages, its
expected time is the expected maximum of that many draws of the per-message time (order statistics). With few
losses per message the draws differ a lot, which is why a lossy ring takes longer than the mean rate suggests.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from .costs import MSS

INITIAL_WINDOW = 10         # segments (RFC 6928)
DELAYED_ACK_S = 0.2         # worst-case delayed ACK a lone segment's probe waits for (RFC 8985 WCDelAckT)
MESSAGES = (60, 600)         # messages simulated per connection (fewer for long ones: ~200k segments in all), the
SEGMENT_BUDGET = 200_000     # first sixth left out
SEED = 0


def message_seconds(rtt: float, loss: float, segments: int, rate_bytes: float | None, seed: int = SEED
                    ) -> np.ndarray:
    """Seconds each steady-state message of ``segments`` takes: per round, a round trip or the link's time for the
    round's segments if longer; plus its loss probes."""
    rng = np.random.default_rng(seed)
    bdp = rate_bytes * rtt / MSS if rate_bytes else np.inf
    cap = max(2 * bdp, 4.0)                         # the window stops growing once the queue fills
    cwnd, ssthresh, out = float(INITIAL_WINDOW), np.inf, []
    messages = int(np.clip(SEGMENT_BUDGET // segments, *MESSAGES))
    for m in range(messages):
        left, t = segments, 0.0
        while left > 0:
            w = int(min(cwnd, left))
            t += max(rtt, w * MSS / rate_bytes) if rate_bytes else rtt
            lost = np.flatnonzero(rng.random(w) < loss)
            if lost.size:
                if w - 1 - lost[0] < 3:             # no three duplicate ACKs after it: a tail-loss probe
                    t += rtt + (DELAYED_ACK_S if w == 1 else 0.0)
                ssthresh = cwnd = max(cwnd / 2, 2.0)
            elif w >= int(cwnd):                    # a loss-free round that filled the window grows it
                cwnd = min(cwnd * 2 if cwnd < ssthresh else cwnd + 1, cap)
            left -= w - lost.size
        if m >= messages // 6:
            out.append(t)
    return np.array(out)


def expected_max(samples: np.ndarray, k: int) -> float:
    """E[max of ``k`` independent draws] from the empirical distribution of ``samples``."""
    x = np.sort(np.asarray(samples, float))
    n = len(x)
    weights = (np.arange(1, n + 1) / n) ** k - (np.arange(n) / n) ** k
    return float(x @ weights)


@cache
def slowest_extra_seconds(rtt: float, loss: float, nbytes: float, rate_bytes: float | None, parallel: int,
                          consecutive: int = 1) -> float:
    """Expected time the slowest of ``parallel`` messages of ``nbytes`` takes beyond one round trip and its
    serialisation at ``rate_bytes`` (what the lossless hop model prices already). ``consecutive`` > 1: what is
    waited for is the slowest connection's run of that many messages in a row (asynchronous gathers queued one
    after another), so the expected maximum is taken over such runs and shared among their messages."""
    segments = max(1, int(np.ceil(nbytes / MSS)))
    priced = rtt + (segments * MSS / rate_bytes if rate_bytes else 0.0)
    times = message_seconds(rtt, loss, segments, rate_bytes)
    runs = max(1, min(consecutive, len(times) // 20))
    sums = times[: len(times) // runs * runs].reshape(-1, runs).sum(axis=1)
    return max(expected_max(sums, max(1, parallel)) / runs - priced, 0.0)
