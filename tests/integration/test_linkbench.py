"""The gloo hop micro-benchmark: workers time real all-gathers (checked for correct data), on loopback without
root and on an emulated link with root, where the times follow the link's delay and rate."""

import json
import os

import pytest

from compactbed.netem.cluster import check_backend, list_namespaces
from compactbed.netem.profiles import LinkSpec
from compactbed.testbed import linkbench
from compactbed.testbed.launch import local_torchrun, run_ranks

pytestmark = pytest.mark.slow
CHECK = check_backend() if os.geteuid() == 0 else None


def test_workers_time_all_gathers_on_loopback(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps(dict(sizes=[[4096, 3], [262144, 4]], timeout_s=30, compute_s=0.01)))
    run_ranks(local_torchrun(job, 2, module="compactbed.testbed.linkbench"), tmp_path, timeout_s=120)
    for r in range(2):
        rows = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert [(x["bytes"], len(x["times"])) for x in rows] == [(4096, 3), (262144, 4)]
        assert all(0 < t < 5 for x in rows for t in x["times"])


@pytest.mark.root
@pytest.mark.skipif(CHECK is None or CHECK.backend is None, reason="no link emulation here")
def test_emulated_link_times_follow_delay_and_rate(tmp_path):
    before = set(list_namespaces())
    spec = LinkSpec(rate_mbit=50, delay_ms=5)
    small, big = linkbench.measure(2, spec, tmp_path, CHECK.backend, sizes=(4096, 524288))
    rtt, transfer = 0.010, 524288 / (50e6 / 8)
    assert small["hops"] == 1 and rtt < small["seconds"] < 4 * rtt, small
    assert transfer < big["seconds"] < 2.5 * transfer + 4 * rtt, big
    assert set(list_namespaces()) == before
