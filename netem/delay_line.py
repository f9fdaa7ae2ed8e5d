"""Userspace delay line on NFQUEUE: one-way delay and jitter where the kernel has no ``netem``.

Runs inside the hub namespace. iptables sends each delayed link's packets to its queue
(``-j NFQUEUE --queue-num Q --queue-bypass``); this process holds each packet's verdict until
arrival + delay (+ uniform jitter) and then accepts it. Only packet metadata is copied to userspace and GSO
super-packets stay whole, so the cost is one small netlink message per packet; release is FIFO per queue
(jitter never reorders, like netem with a rate) and due packets are released in one batch verdict.
Pure stdlib: a raw NETLINK_NETFILTER socket. Prints ``ready`` once bound; exits cleanly on SIGTERM.

usage: python -m compactbed.netem.delay_line Q:DELAY_MS[:JITTER_MS] ...
"""

from __future__ import annotations

import collections
import ctypes
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER, SOL_NETLINK, NETLINK_NO_ENOBUFS, SO_RCVBUFFORCE = 12, 270, 5, 33
NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 1, 4, 2
SUBSYS_QUEUE = 3 << 8
MSG_PACKET, MSG_CONFIG, MSG_VERDICT_BATCH = 0, 2, 3
CFG_CMD, CFG_PARAMS, CFG_MAXLEN, CFG_MASK, CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND, CMD_UNBIND, COPY_META, F_GSO = 1, 2, 1, 4
PACKET_HDR, VERDICT_HDR, NF_ACCEPT = 1, 2, 1
HDR = struct.Struct("=IHHII")


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


class NfQueue:
    """Minimal NFQUEUE client: bind queues, read packet ids, batch-accept."""

    def __init__(self, maxlen: int = 1 << 16):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.seq, self.maxlen = 0, maxlen

    def _msg(self, kind: int, queue: int, attrs: list[bytes], flags: int = NLM_F_REQUEST) -> bytes:
        self.seq += 1
        body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue) + b"".join(attrs)
        return HDR.pack(16 + len(body), SUBSYS_QUEUE | kind, flags, self.seq, 0) + body

    def _config(self, queue: int, attrs: list[bytes]) -> None:
        self.sock.send(self._msg(MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
        data = self.sock.recv(65536)
        _, kind, _, _, _ = HDR.unpack_from(data)
        if kind == NLMSG_ERROR:
            err = struct.unpack_from("=i", data, 16)[0]
            if err:
                raise OSError(-err, f"nfqueue {queue}: {os.strerror(-err)}")

    def bind(self, queue: int) -> None:
        self._config(queue, [_attr(CFG_CMD, struct.pack("!BxH", CMD_BIND, socket.AF_INET))])
        self._config(queue, [_attr(CFG_PARAMS, struct.pack("!IB", 0, COPY_META)),
                             _attr(CFG_MAXLEN, struct.pack("!I", self.maxlen)),
                             _attr(CFG_FLAGS, struct.pack("!I", F_GSO)), _attr(CFG_MASK, struct.pack("!I", F_GSO))])

    def unbind(self, queue: int) -> None:
        try:
            self._config(queue, [_attr(CFG_CMD, struct.pack("!BxH", CMD_UNBIND, socket.AF_INET))])
        except OSError:
            pass

    def accept_upto(self, queue: int, packet_id: int) -> None:
        self.sock.send(self._msg(MSG_VERDICT_BATCH, queue, [_attr(VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))]))

    @staticmethod
    def packets(buf: memoryview):
        """(queue, packet id) of every packet message in a receive buffer."""
        off, end = 0, len(buf)
        while off + 16 <= end:
            length, kind, _, _, _ = HDR.unpack_from(buf, off)
            if length < 16:
                break
            if kind == SUBSYS_QUEUE | MSG_PACKET:
                queue = struct.unpack_from("!H", buf, off + 18)[0]
                a = off + 20
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", buf, a)
                    if alen < 4:
                        break
                    if atype & 0x3FFF == PACKET_HDR:
                        yield queue, struct.unpack_from("!I", buf, a + 4)[0]
                        break
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3


def parse(specs: list[str]) -> dict[int, tuple[float, float]]:
    links = {}
    for spec in specs:
        parts = spec.split(":")
        if not 2 <= len(parts) <= 3:
            raise ValueError(f"bad link spec {spec!r}; expected Q:DELAY_MS[:JITTER_MS]")
        delay, jitter = float(parts[1]) / 1e3, (float(parts[2]) / 1e3 if len(parts) == 3 else 0.0)
        if delay < 0 or jitter < 0:
            raise ValueError(f"negative delay or jitter in {spec!r}")
        links[int(parts[0])] = (delay, jitter)
    return links


def wake_overshoot(n: int = 30) -> float:
    """Median lateness of a 2 ms select() sleep; packets are released that much early."""
    late = []
    for _ in range(n):
        t0 = time.monotonic()
        select.select([], [], [], 0.002)
        late.append(time.monotonic() - t0 - 0.002)
    late.sort()
    return min(max(late[n // 2], 0.0), 0.001)


def serve(links: dict[int, tuple[float, float]], seed: int | None = None) -> None:
    try:
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)   # PR_SET_TIMERSLACK 1 us: accurate wake-ups
    except (OSError, AttributeError):
        pass
    early = wake_overshoot()
    nfq = NfQueue()
    for q in links:
        nfq.bind(q)
    pending = {q: collections.deque() for q in links}
    last = dict.fromkeys(links, 0.0)
    rnd = random.Random(seed)

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"ready pid={os.getpid()} queues={sorted(links)}", flush=True)
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    nfq.sock.setblocking(False)
    try:
        while True:
            now = time.monotonic() + early
            timeout = None
            for q, dq in pending.items():
                upto = None
                while dq and dq[0][0] <= now:
                    upto = dq.popleft()[1]
                if upto is not None:
                    nfq.accept_upto(q, upto)
                if dq:
                    wait = dq[0][0] - now
                    timeout = wait if timeout is None else min(timeout, wait)
            try:
                readable, _, _ = select.select([nfq.sock], [], [], timeout)
            except InterruptedError:
                continue
            if not readable:
                continue
            for _ in range(256):     # drain a bounded burst, then release what is due
                try:
                    n = nfq.sock.recv_into(buf)
                except BlockingIOError:
                    break
                arrived = time.monotonic()
                for q, pid in NfQueue.packets(view[:n]):
                    delay, jitter = links[q]
                    due = max(arrived + max(delay + (rnd.uniform(-jitter, jitter) if jitter else 0.0), 0.0), last[q])
                    last[q] = due
                    pending[q].append((due, pid))
    finally:
        for q, dq in pending.items():
            if dq:
                nfq.accept_upto(q, dq[-1][1])
            nfq.unbind(q)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    serve(parse(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
