"""Measure a shaped link: RTT (small TCP ping-pongs) and goodput (a bulk TCP transfer) from node i to j.

The server runs in node j's namespace, the client in node i's (``python -m compactbed.netem.probe``).
Goodput counts TCP payload over the second half of the transfer (past slow start); at MTU 1500 the wire carries 1514 bytes per 1448 payload bytes, so
``wire_mbit = goodput_mbit * 1514 / 1448`` is what compares with the configured rate.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from .profiles import MATHIS_C, MSS

WIRE_PER_PAYLOAD = 1514 / MSS
PORT = 47_913
RATE_TOLERANCE = 0.10       # a lossless shaped link's wire rate within 10% of its profile
RTT_TOLERANCE = 0.10        # a round trip within 10% of its profile, plus
HOST_RTT_MS = 1.5           # the emulation host's own round trip (0.5-1 ms measured), plus both directions' jitter


@dataclass
class LinkProbe:
    src: int
    dst: int
    rtt_ms: float
    goodput_mbit: float
    wire_mbit: float
    bytes: int
    configured_rate_mbit: float | None
    configured_rtt_ms: float
    configured_jitter_ms: float = 0.0     # both directions'
    lossy: bool = False

    @property
    def rate_error(self) -> float | None:
        """Relative error of the measured wire rate against the configured rate."""
        if self.configured_rate_mbit is None:
            return None
        return self.wire_mbit / self.configured_rate_mbit - 1

    @property
    def misses(self) -> list[str]:
        """How the link misses its profile (empty: it does not). The rate is checked on lossless shaped links only:
        with loss, one TCP flow's goodput is bounded by the loss, not by the link. The round trip may exceed the
        profile's by 10% plus the host's own (up to 1.5 ms) plus both directions' jitter (in-order release under +-jitter
        lengthens it by up to that)."""
        out = []
        if self.rate_error is not None and not self.lossy and abs(self.rate_error) > RATE_TOLERANCE:
            out.append(f"rate {self.wire_mbit:.0f} Mbit/s against {self.configured_rate_mbit:g} ({self.rate_error:+.0%})")
        allowed = RTT_TOLERANCE * self.configured_rtt_ms + HOST_RTT_MS + self.configured_jitter_ms
        if abs(self.rtt_ms - self.configured_rtt_ms) > allowed:
            out.append(f"RTT {self.rtt_ms:.1f} ms against {self.configured_rtt_ms:g} (+-{allowed:.1f} allowed)")
        return out


def _serve(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as srv:
        print("listening", flush=True)
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:                      # ping-pong until the client says how much bulk follows
                msg = conn.recv(64)
                if not msg or msg.startswith(b"BULK"):
                    break
                conn.sendall(msg)
            total, got, t_half = int(msg.split()[1]), 0, None
            while got < total:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
                if t_half is None and got >= total // 2:
                    t_half, half = time.perf_counter(), got
            steady = (got - half) * 8 / max(time.perf_counter() - t_half, 1e-9)   # past slow start
            conn.sendall(json.dumps({"steady_bps": steady}).encode())


def _client(host: str, port: int, nbytes: int, pings: int) -> dict:
    deadline = time.monotonic() + 10
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=60)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            sock.sendall(b"ping")
            sock.recv(64)
            rtts.append(time.perf_counter() - t0)
        sock.sendall(f"BULK {nbytes}".ljust(64).encode())
        time.sleep(0.01)
        block = b"\0" * (1 << 20)
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            sent = sock.send(block[: min(left, len(block))])
            left -= sent
        reply = json.loads(sock.recv(256))
        elapsed = time.perf_counter() - t0
    rtt = statistics.median(rtts)
    return dict(rtt_s=rtt, seconds=elapsed, bytes=nbytes, goodput_bps=reply["steady_bps"])


def bulk_bytes(spec, seconds: float = 1.0, back=None) -> int:
    """The bulk transfer's size: about ``seconds`` at the link's rate (10 Gbit/s if unlimited), 256 KB-256 MB. With
    loss, at the rate one loss-based TCP flow keeps over the round trip (``back``: the way back, whose delay it also
    pays; :data:`.profiles.MATHIS_C`), so that a long lossy path (GEO) is probed in seconds, not
    minutes: its rate is not checked (:attr:`LinkProbe.misses`)."""
    rate_bps = (spec.rate_mbit or 10_000) * 1e6
    if spec.loss_pct:
        rtt_s = max(spec.delay_ms + (back or spec).delay_ms, 0.1) / 1e3
        rate_bps = min(rate_bps, 8 * MATHIS_C * MSS / (rtt_s * (spec.loss_pct / 100) ** 0.5))
    return int(min(max(rate_bps / 8 * seconds, 256_000), 256_000_000))


def measured(src: int, dst: int, spec, back, nbytes: int, client: dict) -> LinkProbe:
    """A probe from the client's report (``_client``) of path src -> dst, configured ``spec`` (``back``: the way
    back, whose delay and jitter the round trip also pays)."""
    good = client["goodput_bps"] / 1e6
    return LinkProbe(src, dst, rtt_ms=client["rtt_s"] * 1e3, goodput_mbit=good, wire_mbit=good * WIRE_PER_PAYLOAD,
                     bytes=nbytes, configured_rate_mbit=spec.rate_mbit,
                     configured_rtt_ms=spec.delay_ms + back.delay_ms,
                     configured_jitter_ms=spec.jitter_ms + back.jitter_ms, lossy=bool(spec.loss_pct or back.loss_pct))


def probe_link(cluster, src: int, dst: int, spec, seconds: float = 1.0) -> LinkProbe:
    """Probe one directed link of an EmulatedCluster (blocking, a second or two)."""
    back = cluster.links.get((dst, src), spec)
    nbytes = bulk_bytes(spec, seconds, back)
    server = subprocess.Popen([*cluster.prefix(dst), sys.executable, "-m", "compactbed.netem.probe", "serve",
                               "--port", str(PORT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server.stdout.readline()
        out = subprocess.run([*cluster.prefix(src), sys.executable, "-m", "compactbed.netem.probe", "client",
                              cluster.address(dst), "--port", str(PORT), "--bytes", str(nbytes)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"probe {src}->{dst} failed: {out.stderr.strip()[-300:]}")
        m = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.kill()
        server.wait()
    return measured(src, dst, spec, back, nbytes, m)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="link probe endpoint (run inside a node namespace)")
    ap.add_argument("role", choices=["serve", "client"])
    ap.add_argument("host", nargs="?")
    ap.add_argument("--port", type=int, default=PORT)
    ap.add_argument("--bytes", type=int, default=10_000_000)
    ap.add_argument("--pings", type=int, default=10)
    a = ap.parse_args(argv)
    if a.role == "serve":
        _serve(a.port)
    else:
        print(json.dumps(_client(a.host, a.port, a.bytes, a.pings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

