"""Pure builders of the ``ip`` / ``tc`` / ``iptables`` commands for an emulated cluster (Mininet style:
build the list, then execute it), so every command can be unit-tested and logged without root.

Topology: a hub namespace routes between N node namespaces. Node k has interface ``nfv`` with address
198.18.k.2/24 (RFC 2544 benchmarking range) and gateway 198.18.k.1 on hub port ``nfh<k>``.
A star (access links): node k's uplink is an htb class on its own ``nfv`` (everything it sends shares it); its
downlink is an htb parent class on hub port k, over one class per source (everything it receives shares it).
A directed path I -> J ends in a leaf under J's class for I (u32 match on I's subnet): a real ``netem`` leaf (the
path's delay, jitter, loss and rate) or, on kernels without netem, a pfifo leaf plus iptables ``statistic`` DROP
for loss and an NFQUEUE rule feeding the userspace delay line. A path of its own (an override, or every path of a
mesh) is shaped at the hub alone, outside both access links.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .profiles import LinkSpec

Backend = Literal["netem", "fallback"]
NODE_IF, HUB_IF = "nfv", "nfh"


@dataclass(frozen=True)
class Names:
    """Namespace names of one emulated cluster; every name starts with the project prefix and a run id."""

    run_id: str

    @property
    def hub(self) -> str:
        return f"cbed-{self.run_id}-hub"

    def node(self, k: int) -> str:
        return f"cbed-{self.run_id}-n{k}"


def node_ip(k: int) -> str:
    return f"198.18.{k}.2"


def hub_ip(k: int) -> str:
    return f"198.18.{k}.1"


def _in(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def hub_port_root(names: Names, k: int) -> list[list[str]]:
    """Hub port k's root htb, its default class unshaped."""
    tc, port = ["ip", "netns", "exec", names.hub, "tc"], f"{HUB_IF}{k}"
    return [tc + ["qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "999"],
            tc + ["class", "add", "dev", port, "parent", "1:", "classid", "1:999", "htb", "rate", "100gbit",
                  "quantum", "60000"]]


def unshaping_commands(names: Names, n: int, star: bool) -> list[list[str]]:
    """Undo :func:`shaping_commands` on a built topology (offloads aside): the nodes' uplink qdiscs (``star``) and
    the hub ports' classes go, each port gets its bare root htb back, the hub's forwarding rules are flushed."""
    cmds = [_in(names.hub, "iptables", "-w", "-F", "FORWARD")]
    for k in range(n):
        cmds += [_in(names.node(k), "tc", "qdisc", "del", "dev", NODE_IF, "root")] if star else []
        cmds += [_in(names.hub, "tc", "qdisc", "del", "dev", f"{HUB_IF}{k}", "root"), *hub_port_root(names, k)]
    return cmds


def topology_commands(names: Names, n: int) -> list[list[str]]:
    """Create the hub and n nodes, wire them, and give each hub port a root htb (default class unshaped)."""
    hub = names.hub
    cmds = [["ip", "netns", "add", hub], ["ip", "-n", hub, "link", "set", "lo", "up"],
            _in(hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")]
    for k in range(n):
        ns, port = names.node(k), f"{HUB_IF}{k}"
        cmds += [
            ["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "link", "add", port, "netns", hub, "type", "veth", "peer", "name", NODE_IF, "netns", ns],
            ["ip", "-n", hub, "addr", "add", f"{hub_ip(k)}/24", "dev", port],
            ["ip", "-n", hub, "link", "set", port, "up"],
            ["ip", "-n", ns, "addr", "add", f"{node_ip(k)}/24", "dev", NODE_IF],
            ["ip", "-n", ns, "link", "set", NODE_IF, "up"],
            ["ip", "-n", ns, "route", "add", "default", "via", hub_ip(k)],
            # 1 Gbit at 40 ms RTT needs ~5 MB in flight: raise the TCP buffer ceilings
            _in(ns, "sysctl", "-qw", "net.ipv4.tcp_rmem=4096 131072 33554432",
                "net.ipv4.tcp_wmem=4096 16384 33554432"),
            *hub_port_root(names, k),
        ]
    return cmds


def burst_bytes(rate_mbit: float) -> int:
    """htb burst: about 1 ms of bytes at the rate, at least 32 KB (larger bursts beat the rate model)."""
    return max(32_000, int(rate_mbit * 1e6 / 8 / 1000))


def queue_number(src: int, dst: int, n: int) -> int:
    return 1 + src * n + dst


def _rate(spec: LinkSpec) -> tuple[str, str]:
    """(htb rate, burst) of a link; unlimited: 100 Gbit/s."""
    mbit = spec.rate_mbit
    return (f"{mbit}mbit" if mbit is not None else "100gbit"), str(burst_bytes(mbit if mbit is not None else 100_000))


def _netem_leaf(spec: LinkSpec) -> list[str]:
    """A real ``netem`` qdisc with the link's delay, jitter, loss and rate (rate inside netem keeps FIFO order
    under jitter)."""
    leaf = ["netem", "limit", str(max(spec.queue_pkts, 1000) * 100), "delay", f"{spec.delay_ms}ms"]
    leaf += [f"{spec.jitter_ms}ms"] if spec.jitter_ms else []
    leaf += ["loss", f"{spec.loss_pct}%"] if spec.loss_pct else []
    return leaf + (["rate", _rate(spec)[0]] if spec.rate_mbit is not None else [])


def _htb_class(tc: list[str], dev: str, parent: str, classid: str, rate: str, burst: str, ceil: str | None = None
               ) -> list[str]:
    ceil = ceil or rate
    return tc + ["class", "replace", "dev", dev, "parent", parent, "classid", classid, "htb", "rate", rate, "ceil",
                 ceil, "burst", burst, "cburst", burst, "quantum", "60000"]


def uplink_commands(names: Names, k: int, access: LinkSpec, own_paths: Iterable[int]) -> list[list[str]]:
    """Node k's shared uplink: an htb class on its interface that everything it sends passes (its default
    class), except traffic to ``own_paths`` destinations (paths of their own, shaped at the hub)."""
    tc = ["ip", "netns", "exec", names.node(k), "tc"]
    rate, burst = _rate(access)
    cmds = [tc + ["qdisc", "add", "dev", NODE_IF, "root", "handle", "1:", "htb", "default", "1"],
            _htb_class(tc, NODE_IF, "1:", "1:1", rate, burst),
            _htb_class(tc, NODE_IF, "1:", "1:999", *_rate(LinkSpec()))]
    for dst in own_paths:
        cmds.append(tc + ["filter", "add", "dev", NODE_IF, "parent", "1:", "pref", str(100 + dst), "protocol", "ip",
                          "u32", "match", "ip", "dst", f"{node_ip(dst)}/32", "flowid", "1:999"])
    return cmds


def downlink_commands(names: Names, k: int, access: LinkSpec) -> list[list[str]]:
    """Node k's shared downlink: an htb parent class on hub port k, over the per-source classes of its paths."""
    rate, burst = _rate(access)
    return [_htb_class(["ip", "netns", "exec", names.hub, "tc"], f"{HUB_IF}{k}", "1:", "1:1", rate, burst)]


def link_commands(names: Names, n: int, src: int, dst: int, spec: LinkSpec, backend: Backend,
                  downlink: LinkSpec | None = None) -> list[list[str]]:
    """Shape the directed path src -> dst at hub port dst: under dst's downlink class when ``downlink`` is given
    (a star; the per-source class is guaranteed an equal share of it), else on its own. Returns commands; the
    fallback delay line is started separately (it is a process, see ``cluster.py``)."""
    hub, port, cls = names.hub, f"{HUB_IF}{dst}", 100 + src
    tc = ["ip", "netns", "exec", hub, "tc"]
    rate, burst = _rate(spec)
    if downlink is None:
        cmds = [_htb_class(tc, port, "1:", f"1:{cls}", rate, burst)]
    else:
        share = f"{downlink.rate_mbit / max(n - 1, 1)}mbit" if downlink.rate_mbit is not None else "100gbit"
        cmds = [_htb_class(tc, port, "1:1", f"1:{cls}", share, burst, ceil=rate)]
    cmds.append(tc + ["filter", "add", "dev", port, "parent", "1:", "pref", str(cls), "protocol", "ip", "u32",
                      "match", "ip", "src", f"198.18.{src}.0/24", "flowid", f"1:{cls}"])
    if backend == "netem":
        cmds.append(tc + ["qdisc", "replace", "dev", port, "parent", f"1:{cls}", "handle", f"{cls}:",
                          *_netem_leaf(spec)])
        return cmds
    cmds.append(tc + ["qdisc", "replace", "dev", port, "parent", f"1:{cls}", "handle", f"{cls}:", "pfifo",
                      "limit", str(max(spec.queue_pkts, 1000) * 100)])
    ipt = ["ip", "netns", "exec", hub, "iptables", "-w", "-A", "FORWARD", "-i", f"{HUB_IF}{src}", "-o", port]
    if spec.loss_pct:
        cmds.append(ipt + ["-m", "statistic", "--mode", "random", "--probability", f"{spec.loss_pct / 100:.6f}",
                           "-j", "DROP"])
    if spec.delay_ms or spec.jitter_ms:
        cmds.append(ipt + ["-j", "NFQUEUE", "--queue-num", str(queue_number(src, dst, n)), "--queue-bypass"])
    return cmds


def cluster_commands(names: Names, n: int, links: dict[tuple[int, int], LinkSpec], backend: Backend,
                     access: list[LinkSpec] | None = None, own_paths: Iterable[tuple[int, int]] = (),
                     ethtool: bool = True) -> list[list[str]]:
    """Every command that builds the cluster: topology, then :func:`shaping_commands`."""
    return topology_commands(names, n) + shaping_commands(names, n, links, backend, access, own_paths, ethtool)


def shaping_commands(names: Names, n: int, links: dict[tuple[int, int], LinkSpec], backend: Backend,
                     access: list[LinkSpec] | None = None, own_paths: Iterable[tuple[int, int]] = (),
                     ethtool: bool = True) -> list[list[str]]:
    """Shape a built topology: access links (a star, when ``access`` gives each node's), every directed path
    (``own_paths``: those shaped on their own, outside the access links), and (``ethtool``) offloads off where a
    link is lossy."""
    own = set(own_paths) if access is not None else set(links)
    cmds = []
    if access is not None:
        for k in range(n):
            cmds += uplink_commands(names, k, access[k], sorted(d for s, d in own if s == k))
            cmds += downlink_commands(names, k, access[k])
    for (s, d), spec in sorted(links.items()):
        cmds += link_commands(names, n, s, d, spec, backend, None if (s, d) in own else access[d])
    if ethtool and needs_offloads_off(links.values()):
        cmds += offload_off_commands(names, n)
    return cmds


def delay_line_specs(n: int, links: dict[tuple[int, int], LinkSpec]) -> list[str]:
    """``Q:DELAY_MS:JITTER_MS`` arguments of the delay line for every delayed link (fallback backend)."""
    return [f"{queue_number(s, d, n)}:{spec.delay_ms}:{spec.jitter_ms}"
            for (s, d), spec in sorted(links.items()) if spec.delay_ms or spec.jitter_ms]


def needs_offloads_off(links: Iterable[LinkSpec]) -> bool:
    """An emulated cluster with any lossy link turns segmentation offloads off on every interface (see
    :func:`offload_off_commands`), so all its traffic crosses the host's forwarding path packet by packet."""
    return any(spec.loss_pct for spec in links)


def offload_off_commands(names: Names, n: int) -> list[list[str]]:
    """Turn off segmentation offloads so loss applies per packet, not per 64 KB super-packet."""
    cmds = []
    for k in range(n):
        cmds.append(_in(names.node(k), "ethtool", "-K", NODE_IF, "tso", "off", "gso", "off", "gro", "off"))
        cmds.append(_in(names.hub, "ethtool", "-K", f"{HUB_IF}{k}", "tso", "off", "gso", "off", "gro", "off"))
    return cmds


def host_commands(src: int, addresses: list[str], links: dict[tuple[int, int], LinkSpec], interface: str,
                  uplink: LinkSpec | None = None, own_paths: Iterable[int] = ()) -> list[list[str]]:
    """Real machines (the scenario's ``hosts:`` form): shape every path leaving host ``src`` on its own interface
    with real ``tc netem``, one htb class + netem leaf per destination address, under one shared uplink class
    when ``uplink`` is given (a star; the receivers' downlinks are not shaped: that needs ingress shaping),
    except the destinations in ``own_paths``."""
    own = set(own_paths)
    tc = ["tc"]
    cmds = [tc + ["qdisc", "replace", "dev", interface, "root", "handle", "1:", "htb", "default", "999"],
            tc + ["class", "replace", "dev", interface, "parent", "1:", "classid", "1:999", "htb", "rate",
                  "100gbit"]]
    parent = "1:"
    if uplink is not None:
        cmds.append(_htb_class(tc, interface, "1:", "1:1", *_rate(uplink)))
        parent = "1:1"
    for dst, addr in enumerate(addresses):
        if dst == src or (src, dst) not in links:
            continue
        spec, cls = links[(src, dst)], 100 + dst
        cmds += [_htb_class(tc, interface, "1:" if dst in own else parent, f"1:{cls}", *_rate(spec)),
                 tc + ["filter", "replace", "dev", interface, "parent", "1:", "pref", str(cls), "protocol", "ip",
                       "u32", "match", "ip", "dst", f"{addr}/32", "flowid", f"1:{cls}"],
                 tc + ["qdisc", "replace", "dev", interface, "parent", f"1:{cls}", "handle", f"{cls}:",
                       *_netem_leaf(spec)]]
    return cmds
