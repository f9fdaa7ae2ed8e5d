"""simulator.tcp: the AIMD sender's steady state against Mathis' bound, a fresh connection's early messages, loss
probes, and the slowest of a round's messages."""

import numpy as np
import pytest
from compactbed.simulator.costs import MSS
from compactbed.simulator.tcp import connection_seconds, expected_max, slowest_extra_seconds


def test_back_to_back_messages_run_near_mathis_rate():
    """A connection sending 200 KB messages on a 40 ms, 0.2% loss path settles near sqrt(3/2) MSS / (RTT sqrt(p)),
    the bound the link probes of the lossy profiles measured (5g: 5.7-15 Mbit/s against 7.8)."""
    segments = 138
    t = connection_seconds(0.04, 0.002, segments, None, 600, np.random.default_rng(0))[0, 100:]
    rate = segments * MSS / t.mean()
    mathis = 1.5 ** 0.5 * MSS / (0.04 * 0.002 ** 0.5)
    assert 0.7 * mathis < rate < 1.6 * mathis
    assert t.std() > 0.2 * t.mean()                  # few losses per message: the messages' times spread widely


def test_a_short_run_at_low_loss_pays_less_than_the_long_run_equilibrium():
    """A fresh connection opens its window past the message in slow start; at 0.02% loss a run of 32 messages of
    272 KB on an 80 ms path sees about one loss, so its messages mostly go in one round trip, while 600 messages
    settle near Mathis' window (~86 segments: 3 rounds for 193)."""
    short = slowest_extra_seconds(0.08, 0.0002, 278528, 59e6, 2, messages=32)
    long = slowest_extra_seconds(0.08, 0.0002, 278528, 59e6, 2, messages=600)
    assert 0 < short < 0.5 * long
    assert long > 0.08                                  # at least one more round trip per message


def test_a_message_within_the_window_on_a_clean_path_costs_nothing_more():
    assert slowest_extra_seconds(0.04, 1e-9, 100 * MSS, 12.5e6, 4) == 0.0


def test_a_lost_lone_segment_waits_for_the_probe_and_the_delayed_ack():
    """One-segment messages: each loss costs the resend's round plus the tail-loss probe's, plus the 200 ms
    worst-case delayed ACK (RFC 8985)."""
    extra = slowest_extra_seconds(0.04, 0.1, 500, 12.5e6, 1)
    assert extra == pytest.approx(0.1 / 0.9 * (2 * 0.04 + 0.2), rel=0.3)


def test_a_round_waits_for_its_slowest_message():
    x = np.array([1.0, 2.0, 3.0])
    assert expected_max(x, 1) == pytest.approx(2.0) and expected_max(x, 2) == pytest.approx(22 / 9)
    e = [slowest_extra_seconds(0.04, 0.002, 100e3, 12.5e6, k) for k in (1, 4, 12)]
    assert 0 < e[0] < e[1] < e[2]
