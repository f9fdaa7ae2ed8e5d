"""CI regression on an emulated slow link: measured figures against the committed baseline, on figures that do not
depend on how fast the host computes; and a deliberately slower exchange is caught.

The baseline (tests/baselines/ci_regression.json) changes only through
``scenario regress scenarios/ci_regression.yaml --baseline tests/baselines/ci_regression.json --update --repeats 3``.
"""

import json
from pathlib import Path

import pytest
from rich.console import Console

from compactbed.netem.cluster import check_backend
from compactbed.scenarios.schema import METHOD_PRESETS, load_scenario
from compactbed.testbed.regress import TIMED, compare, figures
from compactbed.testbed.passes import LinkCheckFailed
from compactbed.testbed.run import run_scenario

pytestmark = pytest.mark.slow
SLOWER = 1.2            # the exchange made this much slower: every link's delay x 1.2 and rate / 1.2
ATTEMPTS = 3


@pytest.fixture(scope="module")
def setup():
    repo = Path(__file__).parents[2]
    if check_backend().backend is None:
        pytest.skip("regression figures are defined on emulated links (needs root + tc)")
    scenario = load_scenario(repo / "scenarios" / "ci_regression.yaml")
    baseline = json.loads((repo / "tests" / "baselines" / "ci_regression.json").read_text())
    return scenario, baseline


def run_checked(scenario, tmp_path, baseline, judged_on=None, report=print, retry_slow=True):
    """Up to ATTEMPTS runs until one is within the baseline (``retry_slow``) or, otherwise, until one is measured:
    noise on the emulation host (a delay line that falls behind on a busy host) only adds time, while a regression
    slows every attempt. A run whose links miss their profile (the host stalled while probing) counts as an attempt
    too. Returns the last attempt's checks."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            results, rows = run_scenario(scenario, tmp_path / f"attempt{attempt}", Console(width=160, quiet=True),
                                         bound=False, ideal=False)
        except LinkCheckFailed as e:
            report(f"  attempt {attempt}: links off profile, not measured ({str(e)[:100]})")
            checks = []
            continue
        assert all(r.status == "ok" for r in rows), [r.error for r in rows]
        checks = compare(figures(results, judged_on=judged_on), baseline)
        bad = [c for c in checks if not c.ok]
        report(f"  attempt {attempt}: {len(checks) - len(bad)} of {len(checks)} figures within tolerance")
        if not bad or not retry_slow:
            break
    return checks


def test_ci_regression_against_baseline(setup, tmp_path, report):
    scenario, baseline = setup
    report(f"regression {scenario.name} ({len(baseline['methods'])} methods):")
    checks = run_checked(scenario, tmp_path, baseline, report=report, retry_slow=False)
    for c in checks:
        report("  " + c.line())
    # the timing figures are reported, not asserted: on a CPU-starved emulation host the delay line stalls and
    # moves them by more than any tolerance that still catches a 20% slower exchange (see docs/VALIDATION.md)
    failed = [c.line() for c in checks if not c.ok and c.figure not in TIMED]
    assert checks and not failed, "figures regressed against the baseline:\n" + "\n".join(failed)


def test_a_slower_exchange_is_caught(setup, tmp_path, report):
    """Ring on links whose delay and rate are 20% worse, judged on the baseline scenario's links: the exchange is
    20% slower than those links allow, and its figure fails."""
    scenario, baseline = setup
    link = scenario.link.model_copy(update={"delay_ms": scenario.link.delay_ms * SLOWER,
                                            "rate_mbit": scenario.link.rate_mbit / SLOWER})
    slowed = scenario.model_copy(update={"link": link, "methods": [METHOD_PRESETS["ring"]]})
    checks = run_checked(slowed, tmp_path, baseline, judged_on=scenario, report=report, retry_slow=False)
    (check,) = [c for c in checks if c.method == "ring" and c.figure == "exchange_vs_model"]
    report(f"exchange {SLOWER - 1:.0%} slower than the baseline's links: " + check.line())
    assert not check.ok and check.measured > check.baseline
