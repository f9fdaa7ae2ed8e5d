"""The regression baseline: medians of repeated runs, timing tolerances from their spread within bounds, and a
comparison that passes the runs it was made from and fails a 20% slower exchange."""

import pytest

from compactbed.testbed.regress import SPREAD_FACTOR, TOLERANCE_RANGE, baseline_of, compare


def runs(*exchange):
    return [{"compact-1bit": dict(bytes_on_wire=1e6, compression_ratio=25.5, psnr_db=33.5, exchange_vs_model=x)}
            for x in exchange]


def test_baseline_is_the_median_and_the_tolerance_follows_the_spread():
    base = baseline_of(runs(1.00, 1.04, 1.01), "s")
    assert base["methods"]["compact-1bit"]["exchange_vs_model"] == 1.01
    tol = base["tolerances"]["compact-1bit/exchange_vs_model"]["value"]
    assert tol == pytest.approx(SPREAD_FACTOR * 0.04 / 1.01, abs=1e-4)
    assert baseline_of(runs(1.0, 1.0), "s")["tolerances"]["compact-1bit/exchange_vs_model"]["value"] == \
        TOLERANCE_RANGE[0]                                                                         # no spread: floor
    assert baseline_of(runs(0.8, 1.0, 1.2), "s")["tolerances"]["compact-1bit/exchange_vs_model"]["value"] == \
        TOLERANCE_RANGE[1]                                                                         # capped


def test_the_runs_pass_and_a_slower_exchange_fails():
    base = baseline_of(runs(1.00, 1.03, 0.98), "s")
    for measured in runs(1.00, 1.03, 0.98):
        assert all(c.ok for c in compare(measured, base))
    (slow,) = runs(1.00 * 1.2)
    bad = [c for c in compare(slow, base) if not c.ok]
    assert [(c.method, c.figure) for c in bad] == [("compact-1bit", "exchange_vs_model")]
    fewer_bytes = {"compact-1bit": runs(1.0)[0]["compact-1bit"] | {"bytes_on_wire": 2e6}}
    assert [c.figure for c in compare(fewer_bytes, base) if not c.ok] == ["bytes_on_wire"]
    assert [c.rule for c in compare({}, base)][0] == "missing from the run"
