"""Messages of a loss-based TCP (reno; CUBIC runs Reno-friendly at these windows) over a lossy path, and what a
collective round that waits for the slowest of its messages pays for them.

A textbook AIMD sender, round trip by round trip (no fitted constant): a round sends min(cwnd, segments left),
each segment lost independently with probability p. Slow start doubles cwnd up to ssthresh, congestion avoidance
adds one segment per loss-free round, and only while the round filled the window (Linux does not grow an
application-limited window). A round with a loss halves cwnd (ssthresh = cwnd / 2, at least 2) and resends what was
lost in the rounds after it; when fewer than three segments followed the first loss in its round, no duplicate ACKs
can signal it and the tail-loss probe does, two round trips later, plus the 200 ms worst-case delayed ACK when it
was the only segment in flight (RFC 8985). The window carries over from message to message on a connection.

A generation opens its connections afresh (initial window, no slow-start threshold) and sends a few dozen to a few
hundred messages on each, so what loss costs is taken over the run's own messages from the connection's start, not
in the long-run equilibrium: at low loss a run sees a loss or two, each halving a window that slow start had opened
past the message size.

A ring round or a direct exchange completes with its slowest message: of ``parallel`` independent messages, its
expected time is the expected maximum of that many draws of the message's time at that point of the run (order
statistics). With few losses per message the draws differ a lot, which is why a lossy ring takes longer than the
mean rate suggests.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from .costs import MSS

INITIAL_WINDOW = 10         # segments (RFC 6928)
DELAYED_ACK_S = 0.2         # worst-case delayed ACK a lone segment's probe waits for (RFC 8985 WCDelAckT)
MAX_MESSAGES = 600          # a run's messages simulated per connection (later ones are taken to cost as these)
RUNS = (24, 400)            # connections simulated per run length: ~400k segments in all, within these bounds
SEGMENT_BUDGET = 400_000
SEED = 0


def connection_seconds(rtt: float, loss: float, segments: int, rate_bytes: float | None, messages: int,
                       rng: np.random.Generator, connections: int = 1) -> np.ndarray:
    """(connections, messages): seconds each of independent fresh connections' first ``messages`` messages of
    ``segments`` takes: per round, a round trip or the link's time for the round's segments if longer; plus its loss
    probes. The connections advance together, round by round (a round's first loss drawn geometrically, the rest
    binomially: the same as drawing each segment)."""
    bdp = rate_bytes * rtt / MSS if rate_bytes else np.inf
    cap = max(2 * bdp, 4.0)                         # the window stops growing once the queue fills
    cwnd, ssthresh = np.full(connections, float(INITIAL_WINDOW)), np.full(connections, np.inf)
    out = np.empty((connections, messages))
    for m in range(messages):
        left, t = np.full(connections, segments), np.zeros(connections)
        while (active := left > 0).any():
            full = np.floor(cwnd).astype(int)
            w = np.where(active, np.minimum(full, left), 0)
            t += np.where(active, np.maximum(rtt, w * MSS / rate_bytes) if rate_bytes else rtt, 0.0)
            first = rng.geometric(loss, connections) - 1 if loss else w     # the round's first lost segment
            hit = active & (first < w)                  # a loss in this round
            lost = np.where(hit, 1 + rng.binomial(np.maximum(w - first - 1, 0), loss), 0) if loss else 0
            tail = hit & (w - 1 - first < 3)            # no three duplicate ACKs after it: a tail-loss probe
            t += np.where(tail, rtt + np.where(w == 1, DELAYED_ACK_S, 0.0), 0.0)
            grow = active & ~hit & (w >= full)          # a loss-free round that filled the window grows it
            halved = np.maximum(cwnd / 2, 2.0)
            cwnd = np.where(hit, halved, np.where(grow, np.minimum(np.where(cwnd < ssthresh, cwnd * 2, cwnd + 1),
                                                                   cap), cwnd))
            ssthresh = np.where(hit, halved, ssthresh)
            left = left - (w - lost)
        out[:, m] = t
    return out


def run_seconds(rtt: float, loss: float, segments: int, rate_bytes: float | None, messages: int,
                seed: int = SEED) -> np.ndarray:
    """(connections, messages): each message's seconds on independent fresh connections (one when lossless)."""
    messages = max(1, min(messages, MAX_MESSAGES))
    runs = 1 if not loss else int(np.clip(SEGMENT_BUDGET // (segments * messages), *RUNS))
    return connection_seconds(rtt, loss, segments, rate_bytes, messages, np.random.default_rng(seed), runs)


def expected_max(samples: np.ndarray, k: int) -> float:
    """E[max of ``k`` independent draws] from the empirical distribution of ``samples``."""
    x = np.sort(np.asarray(samples, float))
    n = len(x)
    weights = (np.arange(1, n + 1) / n) ** k - (np.arange(n) / n) ** k
    return float(x @ weights)


@cache
def slowest_extra_seconds(rtt: float, loss: float, nbytes: float, rate_bytes: float | None, parallel: int,
                          consecutive: int = 1, messages: int = MAX_MESSAGES) -> float:
    """Expected time loss adds to the slowest of ``parallel`` messages of ``nbytes``, on average over a run of
    ``messages`` messages per connection from its start (against the same run without loss, which the lossless hop
    model prices). ``consecutive`` > 1: what is waited for is the slowest connection's run of that many messages in
    a row (asynchronous gathers queued one after another), so the expected maximum is taken over such runs and
    shared among their messages."""
    segments = max(1, int(np.ceil(nbytes / MSS)))
    lossy = run_seconds(rtt, loss, segments, rate_bytes, messages)
    clean = run_seconds(rtt, 0.0, segments, rate_bytes, messages)[0]
    n = lossy.shape[1]
    b = max(1, min(consecutive, n))
    groups = lossy[:, : n // b * b].reshape(len(lossy), -1, b).sum(axis=2)
    slowest = np.mean([expected_max(groups[:, g], max(1, parallel)) for g in range(groups.shape[1])])
    return max((slowest - clean[: n // b * b].reshape(-1, b).sum(axis=1).mean()) / b, 0.0)
