"""Pure builders of the ``ip`` / ``tc`` / ``iptables`` commands for an emulated cluster (Mininet style:
build the list, then execute it), so every command can be unit-tested and logged without root.

Topology: a hub namespace routes between N node namespaces. Node k has interface ``nfv`` with address
198.18.k.2/24 (RFC 2544 benchmarking range) and gateway 198.18.k.1 on hub port ``nfh<k>``. A directed link
I -> J is shaped where packets leave the hub towards J: an htb class per source (u32 match on I's subnet),
and under it either a real ``netem`` leaf (delay, jitter, loss, rate) or, on kernels without netem, a pfifo leaf
plus iptables ``statistic`` DROP for loss and an NFQUEUE rule feeding the userspace delay line.
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
            ["ip", "netns", "exec", hub, "tc", "qdisc", "add", "dev", port, "root", "handle", "1:", "htb",
             "default", "999"],
            ["ip", "netns", "exec", hub, "tc", "class", "add", "dev", port, "parent", "1:", "classid", "1:999",
             "htb", "rate", "100gbit", "quantum", "60000"],
        ]
    return cmds


def burst_bytes(rate_mbit: float) -> int:
    """htb burst: about 1 ms of bytes at the rate, at least 32 KB (larger bursts beat the rate model)."""
    return max(32_000, int(rate_mbit * 1e6 / 8 / 1000))


def queue_number(src: int, dst: int, n: int) -> int:
    return 1 + src * n + dst


def link_commands(names: Names, n: int, src: int, dst: int, spec: LinkSpec, backend: Backend) -> list[list[str]]:
    """Shape the directed link src -> dst (at hub port dst). Returns commands; the fallback delay line is
    started separately (it is a process, see ``cluster.py``)."""
    hub, port, cls = names.hub, f"{HUB_IF}{dst}", 100 + src
    tc = ["ip", "netns", "exec", hub, "tc"]
    rate = f"{spec.rate_mbit}mbit" if spec.rate_mbit is not None else "100gbit"
    burst = str(burst_bytes(spec.rate_mbit if spec.rate_mbit is not None else 100_000))
    cmds = [
        tc + ["class", "replace", "dev", port, "parent", "1:", "classid", f"1:{cls}", "htb", "rate", rate,
              "ceil", rate, "burst", burst, "cburst", burst, "quantum", "60000"],
        tc + ["filter", "add", "dev", port, "parent", "1:", "pref", str(cls), "protocol", "ip", "u32",
              "match", "ip", "src", f"198.18.{src}.0/24", "flowid", f"1:{cls}"],
    ]
    if backend == "netem":
        leaf = ["netem", "limit", str(max(spec.queue_pkts, 1000) * 100), "delay", f"{spec.delay_ms}ms"]
        if spec.jitter_ms:
            leaf += [f"{spec.jitter_ms}ms"]
        if spec.loss_pct:
            leaf += ["loss", f"{spec.loss_pct}%"]
        if spec.rate_mbit is not None:
            leaf += ["rate", rate]        # rate inside netem keeps FIFO order under jitter
        cmds.append(tc + ["qdisc", "replace", "dev", port, "parent", f"1:{cls}", "handle", f"{cls}:", *leaf])
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


def host_commands(src: int, addresses: list[str], links: dict[tuple[int, int], LinkSpec],
                  interface: str) -> list[list[str]]:
    """Real machines (the scenario's ``hosts:`` form): shape every link leaving host ``src`` on its own
    interface with real ``tc netem``, one htb class + netem leaf per destination address."""
    cmds = [["tc", "qdisc", "replace", "dev", interface, "root", "handle", "1:", "htb", "default", "999"],
            ["tc", "class", "replace", "dev", interface, "parent", "1:", "classid", "1:999", "htb", "rate",
             "100gbit"]]
    for dst, addr in enumerate(addresses):
        if dst == src or (src, dst) not in links:
            continue
        spec, cls = links[(src, dst)], 100 + dst
        rate = f"{spec.rate_mbit}mbit" if spec.rate_mbit is not None else "100gbit"
        burst = str(burst_bytes(spec.rate_mbit if spec.rate_mbit is not None else 100_000))
        leaf = ["netem", "limit", str(max(spec.queue_pkts, 1000) * 100), "delay", f"{spec.delay_ms}ms"]
        leaf += [f"{spec.jitter_ms}ms"] if spec.jitter_ms else []
        leaf += ["loss", f"{spec.loss_pct}%"] if spec.loss_pct else []
        leaf += ["rate", rate] if spec.rate_mbit is not None else []
        cmds += [["tc", "class", "replace", "dev", interface, "parent", "1:", "classid", f"1:{cls}", "htb", "rate",
                  rate, "ceil", rate, "burst", burst, "cburst", burst],
                 ["tc", "filter", "replace", "dev", interface, "parent", "1:", "pref", str(cls), "protocol", "ip",
                  "u32", "match", "ip", "dst", f"{addr}/32", "flowid", f"1:{cls}"],
                 ["tc", "qdisc", "replace", "dev", interface, "parent", f"1:{cls}", "handle", f"{cls}:", *leaf]]
    return cmds
