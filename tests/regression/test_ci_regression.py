"""CI regression on an emulated slow link: measured figures against the committed baseline, on figures that do not
depend on how fast the host computes; and a deliberately slower exchange is caught.

The baseline (tests/baselines/ci_regression.json) changes only through
``scenario regress scenarios/ci_regression.yaml --baseline tests/baselines/ci_regression.json --update --repeats 3``.
"""

import json

import pytest
from rich.console import Console

from compactbed.netem.cluster import check_backend
from compactbed.scenarios.schema import METHOD_PRESETS, load_scenario
from compactbed.testbed.regress import compare, figures
from compactbed.testbed.run import run_scenario

pytestmark = pytest.mark.slow
SLOWER = 1.2            # the exchange made this much slower: every link's delay x 1.2 and rate / 1.2


@pytest.fixture(scope="module")
def setup(repo):
    if check_backend().backend is None:
        pytest.skip("regression figures are defined on emulated links (needs root + tc)")
    scenario = load_scenario(repo / "scenarios" / "ci_regression.yaml")
    baseline = json.loads((repo / "tests" / "baselines" / "ci_regression.json").read_text())
    return scenario, baseline


def test_ci_regression_against_baseline(setup, tmp_path, report):
    scenario, baseline = setup
    results, rows = run_scenario(scenario, tmp_path, Console(width=160, quiet=True), bound=False)
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    checks = compare(figures(results), baseline)
    report(f"regression {scenario.name} ({len(checks)} figures vs {len(baseline['methods'])} methods):")
    for c in checks:
        report("  " + c.line())
    failed = [c.line() for c in checks if not c.ok]
    assert not failed, "figures regressed against the baseline:\n" + "\n".join(failed)


def test_a_slower_exchange_is_caught(setup, tmp_path, report):
    """Ring on links whose delay and rate are 20% worse, judged on the baseline scenario's links: the exchange is
    20% slower than those links allow, and its figure fails. (Ring: its exchange figure spreads least between
    runs, so its tolerance is the tightest; the compact methods' allows 15%.)"""
    scenario, baseline = setup
    link = scenario.link.model_copy(update={"delay_ms": scenario.link.delay_ms * SLOWER,
                                            "rate_mbit": scenario.link.rate_mbit / SLOWER})
    slowed = scenario.model_copy(update={"link": link, "methods": [METHOD_PRESETS["ring"]]})
    results, rows = run_scenario(slowed, tmp_path, Console(width=160, quiet=True), bound=False)
    assert [r.status for r in rows] == ["ok"], [r.error for r in rows]
    (check,) = [c for c in compare(figures(results, judged_on=scenario), baseline)
                if c.method == "ring" and c.figure == "exchange_vs_model"]
    report(f"exchange {SLOWER:.0%} slower than the baseline's links: " + check.line())
    assert not check.ok and check.measured > check.baseline
