"""CI regression on an emulated slow link: measured figures against the committed baseline.

The baseline (tests/baselines/ci_regression.json) changes only through
``scenario regress scenarios/ci_regression.yaml --baseline tests/baselines/ci_regression.json --update``.
"""

import json

import pytest
from rich.console import Console

from compactbed.netem.cluster import check_backend
from compactbed.testbed.regress import compare, figures
from compactbed.testbed.run import run_scenario
from compactbed.scenarios.schema import load_scenario

pytestmark = pytest.mark.slow


def test_ci_regression_against_baseline(repo, tmp_path, report):
    scenario = load_scenario(repo / "scenarios" / "ci_regression.yaml")
    baseline = json.loads((repo / "tests" / "baselines" / "ci_regression.json").read_text())
    emulated = check_backend().backend is not None
    if not emulated:
        pytest.skip("regression figures are defined on emulated links (needs root + tc)")
    results, rows = run_scenario(scenario, tmp_path, Console(width=160, quiet=True), bound=False)
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    checks = compare(figures(results), baseline)
    report(f"regression {scenario.name} ({len(checks)} figures vs {len(baseline['methods'])} methods):")
    for c in checks:
        report("  " + c.line())
    failed = [c.line() for c in checks if not c.ok]
    assert not failed, "figures regressed against the baseline:\n" + "\n".join(failed)
