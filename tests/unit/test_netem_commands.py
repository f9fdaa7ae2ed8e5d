"""netem command builders (pure: no root needed) and the delay line's argument parsing."""

import pytest

from compactbed.netem import commands as C
from compactbed.netem.delay_line import parse
from compactbed.netem.profiles import LinkSpec

NAMES = C.Names("ab12cd")


def flat(cmds):
    return [" ".join(c) for c in cmds]


def test_every_created_name_carries_the_project_prefix_and_run_id():
    cmds = flat(C.topology_commands(NAMES, 3))
    created = [c.split()[3] for c in cmds if c.startswith("ip netns add")]
    assert created == ["cbed-ab12cd-hub", "cbed-ab12cd-n0", "cbed-ab12cd-n1", "cbed-ab12cd-n2"]
    assert all(("cbed-ab12cd-" in c) for c in cmds)       # every command targets our namespaces only
    assert not any(c.startswith(("tc ", "iptables ")) for c in cmds)  # never on the host's interfaces
    assert "ip -n cbed-ab12cd-n1 addr add 198.18.1.2/24 dev nfv" in cmds
    assert "ip -n cbed-ab12cd-n1 route add default via 198.18.1.1" in cmds


def test_netem_backend_puts_everything_in_one_netem_leaf():
    spec = LinkSpec(rate_mbit=100, delay_ms=10, jitter_ms=2, loss_pct=1)
    cmds = flat(C.link_commands(NAMES, 4, 1, 3, spec, "netem"))
    assert any("class replace dev nfh3 parent 1: classid 1:101 htb rate 100.0mbit ceil 100.0mbit burst 32000" in c
               for c in cmds)
    assert any("match ip src 198.18.1.0/24 flowid 1:101" in c for c in cmds)
    leaf = [c for c in cmds if " netem " in c]
    assert len(leaf) == 1 and "delay 10.0ms 2.0ms loss 1.0% rate 100.0mbit" in leaf[0]
    assert not any("iptables" in c for c in cmds)


def test_fallback_uses_htb_iptables_and_a_queue_per_link():
    spec = LinkSpec(rate_mbit=1000, delay_ms=5, loss_pct=0.5)
    cmds = flat(C.link_commands(NAMES, 4, 2, 0, spec, "fallback"))
    assert any("pfifo" in c for c in cmds) and not any(" netem " in c for c in cmds)
    drop = [c for c in cmds if "statistic" in c]
    assert len(drop) == 1 and "-i nfh2 -o nfh0" in drop[0] and "--probability 0.005000 -j DROP" in drop[0]
    queue = [c for c in cmds if "NFQUEUE" in c]
    assert len(queue) == 1 and f"--queue-num {C.queue_number(2, 0, 4)} --queue-bypass" in queue[0]
    assert all(c.startswith("ip netns exec cbed-ab12cd-hub") for c in cmds)
    assert C.burst_bytes(1000) == 125_000 and C.burst_bytes(10) == 32_000


def test_unlimited_and_undelayed_links_add_no_rules():
    cmds = flat(C.link_commands(NAMES, 2, 0, 1, LinkSpec(), "fallback"))
    assert not any("iptables" in c for c in cmds)
    assert any("rate 100gbit" in c for c in cmds)


def test_queue_numbers_are_unique_per_directed_link():
    n = 8
    qs = {C.queue_number(s, d, n) for s in range(n) for d in range(n) if s != d}
    assert len(qs) == n * (n - 1)
    links = {(0, 1): LinkSpec(delay_ms=3, jitter_ms=1), (1, 0): LinkSpec(), (1, 2): LinkSpec(delay_ms=4)}
    assert C.delay_line_specs(3, links) == [f"{C.queue_number(0, 1, 3)}:3.0:1.0", f"{C.queue_number(1, 2, 3)}:4.0:0.0"]


def test_delay_line_parses_and_rejects():
    assert parse(["3:10:2", "7:0.5"]) == {3: (0.010, 0.002), 7: (0.0005, 0.0)}
    for bad in ["3", "3:1:2:4", "3:-1"]:
        with pytest.raises(ValueError):
            parse([bad])


def test_hosts_form_shapes_each_destination_with_real_netem():
    links = {(0, 1): LinkSpec(rate_mbit=50, delay_ms=20, loss_pct=0.1), (0, 2): LinkSpec(delay_ms=5),
             (1, 0): LinkSpec(rate_mbit=50)}
    cmds = flat(C.host_commands(0, ["10.0.0.1", "10.0.0.2", "10.0.0.3"], links, "enp1s0"))
    assert all(c.startswith("tc ") and "dev enp1s0" in c for c in cmds)
    assert any("match ip dst 10.0.0.2/32 flowid 1:101" in c for c in cmds)
    assert any("handle 101: netem limit 100000 delay 20.0ms loss 0.1% rate 50.0mbit" in c for c in cmds)
    assert any("handle 102: netem limit 100000 delay 5.0ms" in c and "rate" not in c.split("netem")[1] for c in cmds)
    assert not any("10.0.0.1/32" in c for c in cmds)       # never shapes traffic to itself


def test_a_star_shares_each_nodes_uplink_and_downlink():
    """Node k's uplink: one htb class on its own interface (the default class: everything it sends); its downlink:
    a parent class on hub port k over one class per source; an override is a path of its own, outside both."""
    slow, fast = LinkSpec(rate_mbit=20, delay_ms=5), LinkSpec(rate_mbit=100, delay_ms=2)
    access = [fast, slow, fast]
    links = {(s, d): access[s].then(access[d]) for s in range(3) for d in range(3) if s != d}
    links[(0, 2)] = LinkSpec(rate_mbit=7, delay_ms=1)
    cmds = flat(C.cluster_commands(NAMES, 3, links, "netem", access, own_paths=[(0, 2)]))
    up1 = "ip netns exec cbed-ab12cd-n1 tc "
    assert up1 + "qdisc add dev nfv root handle 1: htb default 1" in cmds
    assert any(c.startswith(up1 + "class replace dev nfv parent 1: classid 1:1 htb rate 20.0mbit ceil 20.0mbit")
               for c in cmds)
    hub = "ip netns exec cbed-ab12cd-hub tc "
    assert any(c.startswith(hub + "class replace dev nfh1 parent 1: classid 1:1 htb rate 20.0mbit") for c in cmds)
    # the paths into node 1 share its downlink: per-source classes under 1:1, an equal share guaranteed, the
    # path's rate as ceiling; the path's delay (5 + 2 ms) in its leaf
    for src in (0, 2):
        assert any(c.startswith(hub + f"class replace dev nfh1 parent 1:1 classid 1:10{src} htb rate 10.0mbit "
                                      "ceil 20.0mbit") for c in cmds)
    assert any("dev nfh1 parent 1:100 handle 100: netem limit 100000 delay 7.0ms rate 20.0mbit" in c for c in cmds)
    # the override 0 -> 2 leaves node 0 unshaped (class 1:999) and is shaped at hub port 2 on its own
    assert "ip netns exec cbed-ab12cd-n0 tc filter add dev nfv parent 1: pref 102 protocol ip u32 match ip dst " \
           "198.18.2.2/32 flowid 1:999" in cmds
    assert any(c.startswith(hub + "class replace dev nfh2 parent 1: classid 1:100 htb rate 7.0mbit") for c in cmds)
    # a mesh: no access classes at all
    mesh = flat(C.cluster_commands(NAMES, 3, links, "netem"))
    assert not any("dev nfv" in c and " tc " in c for c in mesh) and not any("parent 1:1 " in c for c in mesh)


def test_hosts_form_star_puts_each_destination_under_one_uplink():
    up = LinkSpec(rate_mbit=40, delay_ms=3)
    links = {(0, 1): up.then(up), (0, 2): LinkSpec(rate_mbit=5)}
    cmds = flat(C.host_commands(0, ["10.0.0.1", "10.0.0.2", "10.0.0.3"], links, "eth1", up, own_paths=[2]))
    assert any(c.startswith("tc class replace dev eth1 parent 1: classid 1:1 htb rate 40.0mbit") for c in cmds)
    assert any(c.startswith("tc class replace dev eth1 parent 1:1 classid 1:101 htb rate 40.0mbit") for c in cmds)
    assert any(c.startswith("tc class replace dev eth1 parent 1: classid 1:102 htb rate 5.0mbit") for c in cmds)
    assert any("handle 101: netem limit 100000 delay 6.0ms rate 40.0mbit" in c for c in cmds)


def test_hosts_plan_starts_each_host_once_for_every_method_under_its_uplink(tmp_path):
    from pathlib import Path

    from compactbed.scenarios.schema import load_scenario
    from compactbed.testbed.hosts import host_plan

    sc = load_scenario(Path(__file__).parents[2] / "scenarios" / "hosts_example.yaml")
    plan = host_plan(sc, tmp_path).splitlines()
    runs = [line for line in plan if "torch.distributed.run" in line]
    assert len(runs) == sc.world_size                      # one launch per host: the ranks are kept across methods
    assert all(f"{tmp_path}/{m.name}/seed0/job.json" in runs[0] for m in sc.methods)
    wan = sc.link
    assert any(line.startswith(f"tc class replace dev eth0 parent 1: classid 1:1 htb rate {wan.rate_mbit}mbit")
               for line in plan)
    assert any(f"delay {2 * wan.delay_ms}ms" in line for line in plan)     # the path: both access links


def test_reshaping_undoes_the_shaping_and_the_passes_that_share_a_cluster():
    """A cluster is the topology then its shaping; unshaping removes what shaping adds (the nodes' uplink qdiscs in a
    star, the hub ports' classes, the forwarding rules) and gives every hub port its bare root back. Link passes
    share a cluster (and a launch) unless one needs the other offload setting (lossy or not)."""
    from compactbed.scenarios.schema import parse_scenario
    from compactbed.testbed.passes import launch_groups

    access = [LinkSpec(rate_mbit=20, delay_ms=5)] * 2
    links = {(0, 1): access[0].then(access[1]), (1, 0): access[1].then(access[0])}
    assert C.cluster_commands(NAMES, 2, links, "fallback", access) == \
        C.topology_commands(NAMES, 2) + C.shaping_commands(NAMES, 2, links, "fallback", access)
    star, mesh = flat(C.unshaping_commands(NAMES, 2, star=True)), flat(C.unshaping_commands(NAMES, 2, star=False))
    assert "ip netns exec cbed-ab12cd-n1 tc qdisc del dev nfv root" in star and not any(" nfv " in c for c in mesh)
    assert "ip netns exec cbed-ab12cd-hub iptables -w -F FORWARD" in mesh
    for k in range(2):
        assert f"ip netns exec cbed-ab12cd-hub tc qdisc del dev nfh{k} root" in mesh
        assert set(flat(C.hub_port_root(NAMES, k))) <= set(mesh) & set(flat(C.topology_commands(NAMES, 2)))
    passes = ["shaped", "bound", "ideal"]
    sc = parse_scenario(dict(name="s", nodes=2, methods=["ring"], link={"rate_mbit": 20, "delay_ms": 5}))
    assert launch_groups(sc, passes) == [passes]
    lossy = sc.model_copy(update={"link": LinkSpec(rate_mbit=20, delay_ms=5, loss_pct=0.1)})
    assert launch_groups(lossy, passes) == [["shaped", "bound"], ["ideal"]]


def test_link_probe_sizes_its_bulk_transfer_by_what_one_tcp_flow_can_carry():
    """A second at the shaped rate; with loss, a second at the rate one loss-based flow keeps over the path's round
    trip (Mathis), so that a lossy GEO path is probed in seconds rather than timing out; 256 KB at least."""
    from compactbed.netem.probe import bulk_bytes
    from compactbed.netem.profiles import MATHIS_C, MSS

    assert bulk_bytes(LinkSpec(rate_mbit=100, delay_ms=10)) == 12_500_000
    wifi = LinkSpec(rate_mbit=200, delay_ms=6, loss_pct=0.2)              # a 12 ms round trip at 0.2%
    assert bulk_bytes(wifi) == int(MATHIS_C * MSS / (0.012 * 0.002 ** 0.5))  # ~3.3 MB, not 25 MB
    geo = LinkSpec(rate_mbit=25, delay_ms=600, loss_pct=0.2)
    assert bulk_bytes(geo, back=geo) == 256_000
    assert bulk_bytes(LinkSpec(rate_mbit=25, delay_ms=600)) == 3_125_000
