"""The simulator's cost parameters and formulas: a device's compute, the codec, and one collective hop.

A :class:`Calibration` holds every fitted constant (``calibration.json``); :func:`hop_seconds` is the hop cost
model. What each term means and how it is fitted: ``docs/VALIDATION.md``. The fitters are in :mod:`.fit`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..netem.commands import burst_bytes
from ..netem.profiles import MATHIS_C, MSS, LinkSpec

PAYLOAD_FRACTION = MSS / 1514        # TCP payload per wire byte at MTU 1500
# A loss-based algorithm halves its window at every loss, so a flow's rate is bounded by C * MSS / (RTT sqrt(p)) with
# C = sqrt(3/2) (Mathis, Semke, Mahdavi, Ott, "The macroscopic behavior of the TCP congestion avoidance algorithm",
# CCR 1997; Linux counts acked bytes, RFC 3465, so delayed ACKs do not lower it). CUBIC keeps this Reno-friendly
# rate at the round trips and losses of the shipped profiles (RFC 8312, section 4.2). BBR does not back off on
# random loss: its C is fitted (much larger).
LOSS_BASED_C = {"reno": MATHIS_C, "cubic": MATHIS_C}
DATA_DIR = Path(__file__).with_name("data")


@dataclass
class DeviceProfile:
    """Compute coefficients of one device kind; ``cores`` > 0 means ranks on one host share that many cores."""

    a: float
    b: float
    c: float
    step_overhead_s: float = 0.0
    cores: int = 0
    local_step_factor: tuple[float, float] = (1.0, 0.0)     # a local warmup step (every rank, whole sequence, no
                                                            # communication) ends with its slowest rank: f0 + f1 *
                                                            # (share - 1) x the modeled compute, in fresh processes
    kept_local_step_factor: tuple[float, float] | None = None   # the same in processes kept from an earlier job of
                                                            # their launch (None: as in fresh ones)
    hop_overhead_s: float | None = None                     # transport's fixed cost per hop (None: calibrated)
    codec: dict[str, tuple[float, float]] | None = None     # this device's codec costs (None: calibrated)
    codec_call_s: float = 0.0                               # in a run, each codec call (K and V apiece) also
                                                            # pays this (stream state, framing, dispatch)
    reference_pace: float | None = None                     # calibration runs' median single-process reference
                                                            # time / modelled (None: no host-speed scaling)

    def layer_seconds(self, tokens: int, kv_tokens: int, hidden: int, share: float) -> float:
        """One layer of ``tokens`` queries over ``kv_tokens`` keys with ``share`` ranks per core."""
        return share * (self.a + self.b * tokens * hidden ** 2 + self.c * tokens * kv_tokens * hidden)


@dataclass
class Calibration:
    devices: dict[str, DeviceProfile]
    codec: dict[str, tuple[float, float]]          # "1bit/encode" -> (a, b)
    link_efficiency: float = 1.0
    link_overhead_s: float = 0.0
    hop_rtt_factor: float = 1.0          # one collective hop:
    hop_bandwidth_factor: float = 1.0    #   s = k_hop + k_rtt * RTT + k_bw * bytes / rate * (the both-directions
    hop_overhead_s: float = 0.0          #       penalty below if both carry bulk data, as in a 2-rank ring)
    hop_bidirectional_factor: float = 1.0
    bidirectional_half_bytes: float = 0.0  # the both-directions penalty grows with the message: k_bidir - 1 of it at
                                         #   bytes / (bytes + this) (0: the whole penalty at any size)
    jitter_factor: float = 0.5           # in-order release under +-j jitter adds ~k_j * j to each one-way delay
    loss_constant: float = 1.22          # lossy rate: min(rate, C * MSS / (RTT sqrt(p))) (Mathis form, C fitted
                                         #   under the calibration's algorithm; others: loss_constant_for)
    burst_factor: float = 0.0            # share of the shaper's burst allowance a message passes at line rate
    loss_rtts: float = 0.0               # round trips each expected lost packet costs (recovery)
    forwarding_s_per_byte: float = 0.0   # emulation host, offloads off: links active at once share 1/this B/s
    oversubscribed_hop_s: float = 0.0    # per hop and per rank beyond one per core: waiting to be scheduled
    bidirectional_rtt_factor: float = 1.0  # a hop's round trips cost this x k_rtt when the link's two directions
                                         #   carry the exchange at once (a 2-rank ring, all-to-all pairs)
    async_transfer_factor: float = 1.0   # a 2-rank ring's asynchronous gathers (DistriFusion): transfers cost this x
                                         #   a synchronous gather's
    async_sources: list[str] = field(default_factory=list)   # runs it was fitted on where not this calibration's own
                                         #   (`scenario calibrate RESULTS --async-into`)
    congestion_control: str = "bbr"      # the TCP algorithm the hop constants were fitted under (the runs' host's)
    rtt_factor_by_algorithm: dict[str, float] = field(default_factory=dict)   # k_rtt of another algorithm over this
                                         #   one's: measured by the link micro-benchmark in one run (testbed.linkbench),
                                         #   or fitted on whole runs under it (`scenario calibrate RESULTS --rtt-into`)
    rtt_sources: dict[str, list[str]] = field(default_factory=dict)   # per algorithm, the runs it was fitted on
                                         #   (none: the micro-benchmark's)
    sources: list[str] = field(default_factory=list)

    # --- queries used by the model ------------------------------------------------------------------------
    def share(self, world: int, device: str = "cpu") -> float:
        d = self.devices[device]
        return max(1.0, world / d.cores) if d.cores else 1.0

    def layer_seconds(self, tokens: int, kv_tokens: int, hidden: int, share: float, device: str) -> float:
        if device not in self.devices:
            raise KeyError(f"no compute profile for device {device!r}; known: {', '.join(self.devices)}")
        return self.devices[device].layer_seconds(tokens, kv_tokens, hidden, share)

    def codec_kernel_seconds(self, kind: str, op: str, raw_bytes: float, device: str = "cpu") -> float:
        """What the kernel bench measures for one encode or decode of ``raw_bytes``."""
        table = self.devices[device].codec or self.codec
        a, b = table.get(f"{kind}/{op}", table.get(f"1bit/{op}", (0.0, 0.0)))
        return a + b * raw_bytes

    def codec_seconds(self, kind: str, op: str, raw_bytes: float, device: str = "cpu") -> float:
        """One encode or decode of a layer's K/V (``raw_bytes`` uncompressed) in a run: the kernels plus two calls'
        fixed cost (K and V)."""
        return self.codec_kernel_seconds(kind, op, raw_bytes, device) + 2 * self.devices[device].codec_call_s

    def hop_overhead(self, device: str = "cpu") -> float:
        d = self.devices[device].hop_overhead_s
        return self.hop_overhead_s if d is None else d

    def hop_params(self, device: str = "cpu", congestion_control: str = "host") -> tuple[float, ...]:
        """The hop model's parameters (:data:`HOP_PARAMS` order) with ``device``'s fixed cost per hop, and the round
        trips (:meth:`rtt_factor`) and loss response (:meth:`loss_constant_for`) of ``congestion_control``."""
        k = self.rtt_factor(congestion_control)
        return tuple(self.hop_overhead(device) if n == "hop_overhead_s" else
                     self.loss_constant_for(congestion_control) if n == "loss_constant" else
                     getattr(self, n) * (k if n == "hop_rtt_factor" else 1.0) for n in HOP_PARAMS)

    def loss_constant_for(self, congestion_control: str) -> float:
        """C of the loss-bounded rate under ``congestion_control``: the fitted one for the calibration's own
        algorithm (and "host"); a loss-based algorithm's from theory (:data:`LOSS_BASED_C`); else the fitted one."""
        if congestion_control in ("host", self.congestion_control):
            return self.loss_constant
        return LOSS_BASED_C.get(congestion_control, self.loss_constant)

    def rtt_factor(self, congestion_control: str) -> float:
        """How many times the calibration's round trips per hop ``congestion_control`` pays: 1 for its own algorithm
        and for "host" (runs that kept the host's, as the calibration runs did); an algorithm never measured
        against it is priced as its own."""
        return self.rtt_factor_by_algorithm.get(congestion_control, 1.0)

    def effective_rate_bytes(self, spec: LinkSpec) -> float | None:
        if spec.rate_mbit is None:
            return None
        return spec.rate_mbit * 1e6 / 8 * self.link_efficiency * PAYLOAD_FRACTION

    # --- files --------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        (folder / "calibration.json").write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, folder: Path | None = None) -> "Calibration":
        folder = Path(folder) if folder else DATA_DIR
        path = folder / "calibration.json"
        if not path.is_file():
            raise FileNotFoundError(f"no calibration at {path}; build one with `scenario calibrate RESULTS...`")
        raw = json.loads(path.read_text())
        raw["devices"] = {k: DeviceProfile(**v) for k, v in raw["devices"].items()}
        for d in raw["devices"].values():
            if d.codec:
                d.codec = {k: tuple(v) for k, v in d.codec.items()}
            d.local_step_factor = tuple(d.local_step_factor)
        raw["codec"] = {k: tuple(v) for k, v in raw["codec"].items()}
        return cls(**raw)


def burst_of(spec: LinkSpec) -> int:
    """Bytes the emulator's shaper lets through at line rate after an idle period (its htb burst)."""
    return burst_bytes(spec.rate_mbit) if spec.rate_mbit else 0


def hop_seconds(params, rtt, nbytes, rate, bidirectional=0, jitter=0.0, loss=0.0, burst=0.0, forwarding=0,
                oversubscription=0.0):
    """One gloo hop: a handshake round trip (k_rtt of them; k_rtt x k_rtt2 where both directions of the link carry
    the exchange, as in a 2-rank ring; jitter lengthens it: release is in order), the transfer at the link rate of
    what exceeds the shaper's burst allowance or, with loss, at most C * MSS / (RTT sqrt(p)); slower when the reverse
    direction carries bulk data too (its ACKs queue behind it); each expected lost packet costs k_loss round trips;
    plus a fixed cost. ``forwarding`` > 0: this many links are active at once on the emulation host's per-packet
    path and share its capacity (1 / k_fwd bytes/s); that work overlaps the round trips, so the hop takes the longer
    of the two. ``oversubscription``: ranks per core beyond one on the host (share - 1); each hop then waits k_sched x
    that to be scheduled. Array-friendly."""
    k_rtt, k_bw, k_hop, k_bidir, n_bidir, k_jit, c_loss, k_burst, k_loss, k_fwd, k_sched, k_rtt2 = params
    rtt = np.asarray(rtt, float) + 2 * k_jit * np.asarray(jitter, float)
    loss = np.asarray(loss, float)
    rate = np.asarray(rate, float)
    nbytes = np.asarray(nbytes, float)
    lossy = c_loss * MSS / (np.maximum(rtt, 1e-4) * np.sqrt(np.maximum(loss, 1e-12)))
    eff = np.where(loss > 0, np.where(rate > 0, np.minimum(rate, lossy), lossy), rate)
    shaped = np.where(rate > 0, np.maximum(nbytes - k_burst * np.asarray(burst, float), 0.0), nbytes)
    transfer = np.where(eff > 0, shaped / np.where(eff > 0, eff, 1.0), 0.0)
    retransmits = k_loss * loss * (nbytes / MSS + 2) * rtt
    both = 1 + (k_bidir - 1) * nbytes / np.maximum(nbytes + n_bidir, 1e-9)
    link = k_rtt * np.where(bidirectional, k_rtt2, 1.0) * rtt + \
        k_bw * transfer * np.where(bidirectional, both, 1.0) + retransmits
    return k_hop + k_sched * np.asarray(oversubscription, float) + \
        np.maximum(link, nbytes * k_fwd * np.asarray(forwarding, float))


HOP_PARAMS = ("hop_rtt_factor", "hop_bandwidth_factor", "hop_overhead_s", "hop_bidirectional_factor",
              "bidirectional_half_bytes", "jitter_factor", "loss_constant", "burst_factor", "loss_rtts",
              "forwarding_s_per_byte", "oversubscribed_hop_s", "bidirectional_rtt_factor")
