"""A star of access links on this machine (root): a path to a slow node runs at the slow node's rate both ways, a
node sending to several peers at once shares its uplink, and the scenario's congestion control is in force."""

import json
import os
import subprocess
import sys

import pytest

from compactbed.netem.cluster import EmulatedCluster, NetemError, check_backend
from compactbed.netem.probe import PORT, probe_link
from compactbed.netem.profiles import LinkSpec

pytestmark = [pytest.mark.root, pytest.mark.slow]
CHECK = check_backend() if os.geteuid() == 0 else None
needs_shaping = pytest.mark.skipif(CHECK is None or CHECK.backend is None,
                                   reason=f"no link emulation here: {CHECK.reason if CHECK else 'not root'}")


def star(access: list[LinkSpec], **kw) -> EmulatedCluster:
    n = len(access)
    links = {(s, d): access[s].then(access[d]) for s in range(n) for d in range(n) if s != d}
    return EmulatedCluster(n, links, CHECK.backend, access, **kw)


def fan_out(cluster: EmulatedCluster, src: int, dsts: list[int], nbytes: int) -> tuple[float, list[float]]:
    """One bulk TCP flow of ``nbytes`` from ``src`` to each of ``dsts``, started together: (all their bytes over the
    longest flow's time, each flow's own mean rate), in wire Mbit/s."""
    probe = [sys.executable, "-m", "compactbed.netem.probe"]
    servers = [subprocess.Popen([*cluster.prefix(d), *probe, "serve", "--port", str(PORT)], stdout=subprocess.PIPE,
                                text=True) for d in dsts]
    try:
        for s in servers:
            s.stdout.readline()
        clients = [subprocess.Popen([*cluster.prefix(src), *probe, "client", cluster.address(d), "--port", str(PORT),
                                     "--bytes", str(nbytes), "--pings", "1"], stdout=subprocess.PIPE, text=True)
                   for d in dsts]
        out = [c.communicate(timeout=120)[0] for c in clients]
    finally:
        for s in servers:
            s.kill()
            s.wait()
    flows = [json.loads(o.strip().splitlines()[-1]) for o in out]
    wire = 8 * 1514 / 1448 / 1e6
    return (sum(f["bytes"] for f in flows) * wire / max(f["seconds"] for f in flows),
            [f["bytes"] * wire / f["seconds"] for f in flows])


@needs_shaping
def test_a_path_to_a_slow_node_runs_at_its_rate_both_ways():
    fast, slow = LinkSpec(rate_mbit=100, delay_ms=2), LinkSpec(rate_mbit=20, delay_ms=3)
    with star([fast, slow, fast]) as c:
        there, back = probe_link(c, 0, 1, c.links[(0, 1)]), probe_link(c, 1, 0, c.links[(1, 0)])
        other = probe_link(c, 0, 2, c.links[(0, 2)])
    for p in (there, back):
        assert p.configured_rate_mbit == 20 and abs(p.rate_error) < 0.1, p
        assert p.configured_rtt_ms == 10 and abs(p.rtt_ms - 10) < 1 + 1.5, p    # 2 + 3 ms each way
    assert other.configured_rate_mbit == 100 and abs(other.rate_error) < 0.1, other


@needs_shaping
def test_a_node_sending_to_three_peers_shares_its_uplink():
    """Node 0's 40 Mbit/s uplink carries its three flows together (in a mesh each got 40 Mbit/s of its own)."""
    rate = 40
    access = [LinkSpec(rate_mbit=rate)] + [LinkSpec(rate_mbit=1000)] * 3
    with star(access) as c:
        together, flows = fan_out(c, 0, [1, 2, 3], nbytes=rate * 1_000_000 // 8)
        links = c.links
    assert abs(together / rate - 1) < 0.15, (together, flows)
    with EmulatedCluster(4, links, CHECK.backend) as mesh:          # the same paths, each on its own
        apart, flows = fan_out(mesh, 0, [1, 2, 3], nbytes=rate * 1_000_000 // 8)
    assert apart > 1.8 * rate, (apart, flows)


@needs_shaping
def test_the_congestion_control_asked_for_is_in_force_in_every_node():
    host = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()
    with star([LinkSpec()] * 2, congestion_control="cubic") as c:
        cc = c.congestion
        assert [c.in_force(k) for k in range(2)] == [cc["in_force"]] * 2
        assert cc["requested"] == "cubic" and cc["in_force"] in ("cubic", "reno")
        assert cc["in_force"] == "cubic" or "cubic refused" in cc["reason"]
    with star([LinkSpec()] * 2, congestion_control="reno") as c:
        assert [c.in_force(k) for k in range(2)] == ["reno", "reno"]
    with star([LinkSpec()] * 2, congestion_control="host") as c:
        assert c.congestion["in_force"] == host
    with pytest.raises(NetemError, match="'nosuchcc' cannot be set in the node namespaces.*available"):
        with star([LinkSpec()] * 2, congestion_control="nosuchcc"):
            pass


@needs_shaping
def test_reshaping_in_place_takes_the_new_links_and_refuses_a_change_of_offloads():
    """The bound and ideal passes reshape the running cluster: the rate lifts (delay kept), then the delay goes too;
    a lossy pass needs the other offload setting, so it is refused (it gets a cluster of its own)."""
    shaped = LinkSpec(rate_mbit=20, delay_ms=5)
    with star([shaped, shaped]) as c:
        before = probe_link(c, 0, 1, c.links[(0, 1)])
        unlimited = LinkSpec(delay_ms=5)
        c.reshape({k: unlimited.then(unlimited) for k in c.links}, [unlimited, unlimited])
        bound = probe_link(c, 0, 1, c.links[(0, 1)])
        c.reshape({k: LinkSpec() for k in c.links}, [LinkSpec(), LinkSpec()])
        ideal = probe_link(c, 0, 1, c.links[(0, 1)])
        with pytest.raises(NetemError, match="offload"):
            lossy = LinkSpec(rate_mbit=20, loss_pct=1)
            c.reshape({k: lossy for k in c.links}, [lossy, lossy])
    assert abs(before.rate_error) < 0.1 and abs(before.rtt_ms - 20) < 2 + 1.5, before
    assert bound.wire_mbit > 5 * 20 and abs(bound.rtt_ms - 20) < 2 + 1.5, bound
    assert ideal.wire_mbit > 5 * 20 and ideal.rtt_ms < 2, ideal
