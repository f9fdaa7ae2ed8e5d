"""SimPy model of one generation: ranks are processes, directed links are resources.

Per denoising step every rank runs its layers; each layer's exchange follows the method's pattern, as the
runtime executes it on gloo:
  ring / patch   K/V all-gather per layer (torch's ring attention uses an all-gather rotater; gloo's
                 all-gather is a ring): P-1 rounds, each chunk sent in two halves after the receiver's ready
                 notice, simulated operation by operation per link (:meth:`Simulator.allgather_exits`)
  ulysses        two all-to-alls per layer (Q/K/V in, output back); each rank sends 1/P of its data to every
                 peer over separate links
  usp            both, on their sub-groups
  distrifusion   the all-gather of the previous step's K/V runs asynchronously, overlapping compute; a step
                 waits only for what has not arrived by the time it needs it; two gathers run at once (gloo's
                 worker threads), and on 2 ranks the async transfers have their own calibrated cost factor
                 (``async_gathers_seconds``)
Compressed methods send codec payloads and pay encode/decode time. Warmup steps are full precision (sync) or
computed for the whole sequence on every rank with no communication (local). A hop's cost (round trip,
transfer, loss, jitter) comes from the calibrated hop model (``calibration.hop_seconds``), and an exchange takes
no less than the run's host probe measured one to add beside computing ranks over loopback
(``Cluster.exchange_floor_s``: an all-gather's operations, a direct round, a pipeline send). A collective occupies
the links it uses (resources), so an asynchronous gather and the next synchronous exchange contend.
Where ranks outnumber the host's cores (the emulation host), ring and patch steps follow every rank on its own:
it computes on the cores shared with whichever ranks compute at the same time (processor sharing) from the moment
it left the previous gather, so ranks staggered by a link mix share the cores less than in lockstep. Elsewhere
ranks run in lockstep and the layers of a step, being identical, are simulated once and scaled. Cost grows at most
linearly in nodes x layers x steps (per-rank layers are memoized on the ranks' offsets, which settle after a few
layers), plus P^2 per distinct collective for the ring's operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cache

import simpy

from ..netem.commands import needs_offloads_off
from ..netem.profiles import LinkSpec
from ..scenarios.schema import Scenario
from . import cfg, pipefusion
from .costs import LOSS_BASED_C, Calibration, burst_of, hop_seconds
from .tcp import MAX_MESSAGES, slowest_extra_seconds
from .workload import Workload

GLOO_THREADS = 2     # asynchronous collectives a gloo process group runs at once (ProcessGroupGloo's Options.threads)


@dataclass(frozen=True)
class Cluster:
    """Per-rank compute scale (1 = calibrated device) and one LinkSpec per directed link."""

    compute_scale: tuple[float, ...]
    links: dict[tuple[int, int], LinkSpec]
    device: str = "cpu"
    shared_uplink: bool = False   # True: a node's sends to all peers share its uplink (a star's access link,
                                  # a host's NIC); False: every directed link is independent (mesh)
    forwarding: bool = False      # emulated on the calibrated host with offloads off (a lossy link): active
                                  # links share the host's per-packet forwarding capacity
    htb_shaped: bool = True       # links rate-limited by this project's htb shaper (emulated or hosts form), whose
                                  # burst allowance passes at line rate; False: links that are that rate end to end
    congestion_control: str = "host"   # TCP algorithm of the ranks (Calibration.rtt_factor)
    host_ranks: int = 0           # ranks sharing the calibrated host's cores (0: this cluster's; a CFG group shares
                                  # them with the other group)
    fresh_processes: bool = False  # the generation is its processes' first job (the runtime keeps ranks across
                                   # jobs: only a launch's first job starts cold)
    exchange_floor_s: float = 0.0  # the least one exchange costs on the host beside computing ranks, whatever the
                                   # link (the run's host probe, points.exchange_floor); 0: not probed

    @property
    def world(self) -> int:
        return len(self.compute_scale)

    def on_host(self, pace: float, exchange_floor_s: float) -> "Cluster":
        """This cluster as a measured host runs it: compute scaled by the host's pace against the calibration's
        (``points.host_factors``), every exchange at no less than the host's floor (``points.exchange_floor``)."""
        return replace(self, compute_scale=tuple(k * pace for k in self.compute_scale),
                       exchange_floor_s=exchange_floor_s)

    def subset(self, ranks: list[int]) -> "Cluster":
        """The cluster of ``ranks`` alone (renumbered from 0), still sharing the host with every rank of this one."""
        return replace(self, compute_scale=tuple(self.compute_scale[r] for r in ranks),
                       links={(i, j): self.links[(a, b)] for i, a in enumerate(ranks) for j, b in enumerate(ranks)
                              if a != b}, host_ranks=self.host_ranks or self.world)


def cluster_of(scenario: Scenario, device: str = "cpu", unlimited_rate: bool = False, ideal: bool = False
               ) -> Cluster:
    """The scenario as the simulator sees it: per-node compute scale and its directed links (rate lifted for the
    bound pass; no shaping, no added delay for the ideal pass)."""
    links = scenario.directed_links(unlimited_rate, ideal)
    # the per-packet forwarding limit belongs to the emulation host the "cpu" profile was measured on
    forwarding = device == "cpu" and not scenario.on_hosts and needs_offloads_off(links.values())
    return Cluster(tuple(node.compute_scale for node in scenario.nodes), links, device,
                   shared_uplink=scenario.topology == "star", forwarding=forwarding,
                   congestion_control=scenario.congestion_control)


def processor_sharing(starts: list[float], works: list[float], cores: float) -> list[float]:
    """Finish times of jobs arriving at ``starts`` with ``works`` seconds of one-core work, on ``cores`` cores shared
    equally by the jobs running at each moment (each runs at min(1, cores / running) of a core)."""
    order = sorted(range(len(starts)), key=starts.__getitem__)
    left, finish, running = list(works), [0.0] * len(works), []
    t, nxt = starts[order[0]] if order else 0.0, 0
    while running or nxt < len(order):
        while nxt < len(order) and starts[order[nxt]] <= t:
            running.append(order[nxt])
            nxt += 1
        if not running:
            t = starts[order[nxt]]
            continue
        rate = min(1.0, cores / len(running))
        dt = min(left[j] for j in running) / rate
        if nxt < len(order):
            dt = min(dt, starts[order[nxt]] - t)
        t += dt
        for j in running:
            left[j] -= dt * rate
        for j in [j for j in running if left[j] <= 1e-12]:
            finish[j] = t
            running.remove(j)
    return finish


@dataclass
class Prediction:
    latency_s: float
    compute_s: float
    comm_s: float
    codec_s: float
    bytes_on_wire: int
    timeline: list[tuple[int, str, float, float]] = field(default_factory=list)   # (rank, kind, start, end)


class LinkModel:
    """Transfer time of a message over one directed link, from calibrated rate/latency."""

    def __init__(self, calib: Calibration, device: str = "cpu", world: int = 1, htb_shaped: bool = True,
                 congestion_control: str = "host", run_messages: int = MAX_MESSAGES):
        self.calib, self.device, self.congestion_control = calib, device, congestion_control
        self.run_messages = run_messages      # messages a run sends on each connection (loss is priced over them)
        self.oversubscription = calib.share(world, device) - 1
        self.htb_shaped = htb_shaped
        self._memo: dict[tuple, float] = {}

    def seconds(self, spec: LinkSpec, nbytes: float, bidirectional: bool = False, forwarding: int = 0,
                parallel: int = 1, message: float | None = None, consecutive: int = 1) -> float:
        """One collective hop of ``nbytes`` over ``spec`` (the calibrated hop model, see calibration.py), with
        ``forwarding`` links active at once on the emulation host's per-packet path (0: not on it). On a lossy link
        under a loss-based algorithm, the hop also waits for the slowest of the ``parallel`` messages (of
        ``message`` bytes each, default ``nbytes``) its round sends at once, or of their runs of ``consecutive``
        messages where that many collectives are queued back to back (:mod:`.tcp`)."""
        key = (spec, nbytes, bidirectional, forwarding, parallel, message, consecutive)
        if key not in self._memo:
            self._memo[key] = self._seconds(spec, nbytes, bidirectional, forwarding, parallel, message, consecutive)
        return self._memo[key]

    def _seconds(self, spec: LinkSpec, nbytes: float, bidirectional: bool, forwarding: int, parallel: int,
                 message: float | None, consecutive: int) -> float:
        c = self.calib
        params = c.hop_params(self.device, self.congestion_control)
        rtt = 2 * (spec.delay_ms / 1e3 + c.link_overhead_s)
        rate = c.effective_rate_bytes(spec) or 0.0
        jitter, loss = spec.jitter_ms / 1e3, spec.loss_pct / 100
        aimd = loss > 0 and self.congestion_control in LOSS_BASED_C     # reno, cubic: the window halves per loss
        hop = float(hop_seconds(params, rtt, nbytes, rate, bidirectional, jitter, 0.0 if aimd else loss,
                                burst_of(spec) if self.htb_shaped else 0, forwarding, self.oversubscription))
        if aimd:
            hop += slowest_extra_seconds(rtt + 2 * c.jitter_factor * jitter, loss,
                                         nbytes if message is None else message, rate or None, parallel, consecutive,
                                         self.run_messages)
        return hop


class Simulator:
    """Predict one generation of ``workload`` on ``cluster`` with calibration ``calib``."""

    def __init__(self, workload: Workload, cluster: Cluster, calib: Calibration, timeline: bool = False):
        if cluster.world != workload.world:
            raise ValueError(f"cluster has {cluster.world} ranks, workload {workload.world}")
        self.w, self.c, self.calib = workload, cluster, calib
        self.host_ranks = cluster.host_ranks or cluster.world
        self.links = LinkModel(calib, cluster.device, self.host_ranks, cluster.htb_shaped, cluster.congestion_control,
                               workload.connection_messages)
        self.keep_timeline = timeline
        self._exchange: dict[bool, float] = {}
        self._layers: dict[tuple, tuple] = {}
        self._steps: dict[tuple, tuple] = {}

    # --- per-layer costs --------------------------------------------------------------------------------------
    def layer_compute(self, rank: int, local: bool) -> float:
        """One layer on ``rank``: its sequence shard, or (local warmup) the whole sequence, with the local step's
        factor in fresh or kept processes (calibration.DeviceProfile.local_step_factor, kept_local_step_factor)."""
        w, d = self.w, self.calib.devices[self.c.device]
        tokens = w.batch * w.tokens if local else w.local_tokens
        share = self.calib.share(self.host_ranks, self.c.device)
        factor = d.local_step_factor if self.c.fresh_processes or d.kept_local_step_factor is None \
            else d.kept_local_step_factor
        f0, f1 = factor if local and w.world > 1 else (1.0, 0.0)
        return self.calib.layer_seconds(tokens, w.batch * w.tokens, w.shape.hidden, share, self.c.device) \
            * self.c.compute_scale[rank] * (f0 + f1 * (share - 1))

    def codec_seconds(self, warm: bool) -> tuple[float, float]:
        """(encode, decode one payload) per layer for this rank."""
        if warm or not self.w.method.compressed:
            return 0.0, 0.0
        kind = self.w.method.codec.compressor.kind
        raw = self.w.kv_bytes()
        dev = self.c.device
        return self.calib.codec_seconds(kind, "encode", raw, dev), self.calib.codec_seconds(kind, "decode", raw, dev)

    def allgather_seconds(self, nbytes: float, ranks: list[int], consecutive: int = 1) -> float:
        """gloo ring all-gather of ``nbytes`` per rank with every rank entering at once: the time its last rank
        has every chunk (:meth:`allgather_exits`; ``consecutive``: one of that many queued back to back)."""
        return max(self.allgather_exits(nbytes, [0.0] * len(ranks), ranks, consecutive)) if len(ranks) > 1 else 0.0

    def allgather_exits(self, nbytes: float, entry: list[float], ranks: list[int] | None = None,
                        consecutive: int = 1) -> list[float]:
        """When each rank of a gloo ring all-gather of ``nbytes`` per rank has every chunk, given when each entered
        it. gloo sends each rank's chunk in two halves, 2(P-1) operations with two in flight: a rank posts operation
        i (send to its successor, receive from its predecessor) once operation i-2 has completed on both sides. A
        send starts only once the receiver's ready notice is in (gloo's rendezvous): a hop's latency (its cost for
        an empty message) is that notice's way back plus the data's way there, half each. So a rank that enters
        late holds up its predecessor's sends too, and a slow hop holds up the ranks after it; a half's transfer
        overlaps the next half's notice; an operation completes no sooner than the host's exchange floor after it
        was posted. With equal entries on uniform links: (P-1) x one hop for small messages,
        (P-1) transfers plus one latency for large ones."""
        ranks = list(range(len(entry))) if ranks is None else ranks
        p = len(ranks)
        if p < 2:
            return list(entry)
        both_ways = p == 2          # a 2-rank ring sends both ways over the same pair of links
        active = self.c.world if self.c.forwarding else 0       # every rank sends one stream at a time
        links = [self.c.links[(ranks[i], ranks[(i + 1) % p])] for i in range(p)]
        latency = [self.links.seconds(spec, 0.0, both_ways, active, p, consecutive=consecutive) for spec in links]
        half = [(self.links.seconds(spec, nbytes, both_ways, active, p, consecutive=consecutive) - lat) / 2
                for spec, lat in zip(links, latency)]
        done = [list(entry), list(entry)]           # operations i-2 and i-1 completed (posts of i and i+1)
        floor = self.c.exchange_floor_s             # the host's least per operation after its post
        link_free = list(entry)
        for _ in range(2 * (p - 1)):
            posted = done[0]
            arrived, sent = [0.0] * p, [0.0] * p
            for r in range(p):
                nxt = (r + 1) % p
                start = max(posted[r], posted[nxt] + latency[r] / 2, link_free[r])
                sent[r] = link_free[r] = start + half[r]
                arrived[nxt] = start + latency[r] / 2 + half[r]
            done = [done[1], [max(a, t, q + floor) for a, t, q in zip(arrived, sent, posted)]]
        return [max(a, b) for a, b in zip(*done)]

    def alltoall_seconds(self, nbytes: float, ranks: list[int]) -> float:
        """Each rank sends nbytes/P to every peer (:meth:`one_round_seconds`)."""
        return self.one_round_seconds(nbytes / max(len(ranks), 1), ranks)

    def one_round_seconds(self, per_peer: float, ranks: list[int]) -> float:
        """Each rank sends ``per_peer`` bytes to every peer at once, both directions of every pair loaded (an
        all-to-all, a direct K/V exchange): one hop whose transfer carries the P-1 sends through a shared uplink
        (a star, a host's NIC); the slowest pair gates (hop costs are memoized per distinct link, so all P(P-1) pairs
        cost dictionary lookups only)."""
        p = len(ranks)
        if p < 2:
            return 0.0
        share = (p - 1) if self.c.shared_uplink else 1          # P-1 sends through one uplink
        active = self.c.world * (p - 1) if self.c.forwarding else 0
        return max([self.c.exchange_floor_s] + [
            self.links.seconds(self.c.links[(a, b)], share * per_peer, True, active, p * (p - 1), per_peer)
            for a in ranks for b in ranks if a != b])

    def hidden_seconds(self, rank: int) -> float:
        """What of a direct ring exchange runs behind this rank's compute: its own attention block (its queries
        over its own K/V shard: the attention term of the layer's compute over P), started once the payload is
        sent."""
        w = self.w
        if w.method.exchange != "direct" or w.method.own_attention_exchange:
            return 0.0
        d = self.calib.devices[self.c.device]
        share = self.calib.share(self.host_ranks, self.c.device)
        own = share * d.c * w.local_tokens * (w.batch * w.tokens / w.world) * w.shape.hidden
        return own * self.c.compute_scale[rank]

    def async_gathers_seconds(self) -> float:
        """One step's DistriFusion refresh: L all-gathers, asynchronous. Queued back to back, they wait on lossy links
        for the slowest connection's run of L messages, not L times for the slowest one. Gloo's worker threads run
        :data:`GLOO_THREADS` of them at once, so their round trips overlap that many at a time while their bytes
        share the links. On a 2-rank ring (one pair, both directions loaded) the transfers cost the calibrated
        ``async_transfer_factor`` x a synchronous gather's on the same path without loss, and the loss recovery
        (what loss adds to them) in full, since it stalls the one connection each way for every gather on it; on
        rings of more ranks the transfers cost what a synchronous gather's do."""
        everyone, L = list(range(self.w.world)), self.w.shape.layers
        latency = self.allgather_seconds(0.0, everyone, L)
        transfer = self.allgather_seconds(self.w.kv_wire_bytes(False), everyone, L) - latency
        round_trips = math.ceil(L / GLOO_THREADS) * latency
        if self.w.world != 2:
            return round_trips + L * transfer
        clean = transfer
        if any(spec.loss_pct for spec in self.c.links.values()):
            links = {k: v.model_copy(update={"loss_pct": 0.0}) for k, v in self.c.links.items()}
            without = Simulator(self.w, replace(self.c, links=links), self.calib)
            clean = min(transfer, without.allgather_seconds(self.w.kv_wire_bytes(False), everyone, L)
                        - without.allgather_seconds(0.0, everyone, L))
        k = self.calib.async_transfer_factor
        return round_trips + L * (k * clean + transfer - clean)

    def exchange_seconds(self, warm: bool) -> float:
        """Communication of one layer for the method (all ranks); the same for every step of a kind."""
        if warm not in self._exchange:
            self._exchange[warm] = self._exchange_seconds(warm)
        return self._exchange[warm]

    def _exchange_seconds(self, warm: bool) -> float:
        w, p = self.w, self.w.world
        payload = w.kv_wire_bytes(warm)
        everyone = list(range(p))
        if w.method.gathers_kv:
            if w.method.exchange == "direct":
                return self.one_round_seconds(payload, everyone)
            return self.allgather_seconds(payload, everyone)
        u, r = w.degrees
        qkv = payload * 3 / 2                    # Q, K, V in; the output (one tensor) comes back
        t = 0.0
        if u > 1:
            groups = [list(range(g * u, g * u + u)) for g in range(p // u)]
            t += max(self.alltoall_seconds(qkv, g) + self.alltoall_seconds(payload / 2, g) for g in groups)
        if r > 1:
            groups = [list(range(i, p, u)) for i in range(u)]
            t += max(self.allgather_seconds(payload / u, g) for g in groups)
        return t

    # --- ranks one by one on shared cores ---------------------------------------------------------------------
    def ranks_share_cores(self) -> bool:
        """Ranks outnumber the host's cores and every layer ends in a synchronous all-gather: each rank is then
        simulated on its own (its compute on the cores shared with whichever ranks compute at the same time, its
        own gather entry and exit) instead of in lockstep, because ranks that leave a gather early compute with
        fewer others (on a link mix, 4 ranks on 2 cores compute at ~1.6x one core's time, not 2x)."""
        return self.w.method.synchronous_gather and self.w.method.exchange == "ring" and \
            self.calib.share(self.host_ranks, self.c.device) > 1

    def layer_per_rank(self, ready: tuple[float, ...], warm: bool) -> tuple[tuple[float, ...], ...]:
        """One synchronous layer with each rank ready to compute at ``ready``: compute (processor sharing of the
        host's cores), encode, all-gather, decode. Returns when each rank is ready for the next layer, ends its
        compute, enters and leaves the gather (memoized on the ranks' offsets)."""
        key = (tuple(round(x, 9) for x in ready), warm)
        if key not in self._layers:
            w, p = self.w, self.w.world
            one_core = self.calib.layer_seconds(w.local_tokens, w.batch * w.tokens, w.shape.hidden, 1.0, self.c.device)
            done = processor_sharing(list(ready), [one_core * s for s in self.c.compute_scale],
                                     self.calib.devices[self.c.device].cores)
            enc, dec = self.codec_seconds(warm)
            entry = [t + enc for t in done]
            exits = self.allgather_exits(w.kv_wire_bytes(warm), entry)
            self._layers[key] = (tuple(t + (p - 1) * dec for t in exits), tuple(done), tuple(entry), tuple(exits))
        return self._layers[key]

    def step_per_rank(self, lag: list[float], warm: bool, gather: int) -> tuple[float, list[float], float, list]:
        """One synchronous step, ranks ready ``lag`` (<= 0) before the previous step's end, ending with the output
        gather of ``gather`` bytes per rank (0: none). Returns the step's duration from that end, each rank's lag at
        its end, its summed slowest-rank compute, and per-rank intervals (rank, kind, start, end) relative to the
        previous end (memoized on the lags, which settle after a step or two, so the remaining steps cost a
        lookup)."""
        key = (tuple(round(x, 9) for x in lag), warm, gather)
        if key not in self._steps:
            self._steps[key] = self._step_per_rank(lag, warm, gather)
        duration, lags, compute, spans = self._steps[key]
        return duration, list(lags), compute, spans

    def _step_per_rank(self, lag: list[float], warm: bool, gather: int) -> tuple[float, list[float], float, list]:
        w, L = self.w, self.w.shape.layers
        base = min(lag)
        ready = tuple(x - base for x in lag)
        compute, spans = 0.0, []
        for _ in range(L):
            nxt, done, entry, exits = self.layer_per_rank(ready, warm)
            compute += max(d - r for d, r in zip(done, ready))
            if self.keep_timeline:
                for r in range(w.world):
                    spans += [(r, "compute", base + ready[r], base + done[r]),
                              (r, "codec", base + done[r], base + entry[r]), (r, "comm", base + entry[r], base + exits[r]),
                              (r, "codec", base + exits[r], base + nxt[r])]
            shift = min(nxt)
            base, ready = base + shift, tuple(x - shift for x in nxt)
        out = self.allgather_exits(gather, list(ready)) if gather else list(ready)
        overhead = self.calib.devices[self.c.device].step_overhead_s * self.calib.share(self.host_ranks, self.c.device)
        end = base + max(out) + overhead
        if self.keep_timeline:
            spans += [(r, "comm", base + ready[r], base + out[r]) for r in range(w.world)]
        return end, [base + t + overhead - end for t in out], compute, spans

    # --- the event model --------------------------------------------------------------------------------------
    def run(self) -> Prediction:
        if self.w.cfg > 1:
            return self._cfg_run()
        if self.w.method.pipelined:
            return self._pipefusion_run()
        env = simpy.Environment()
        w, p, L = self.w, self.w.world, self.w.shape.layers
        link_res = {k: simpy.Resource(env, capacity=1) for k in self.c.links}
        stats = dict(compute=0.0, comm=0.0, codec=0.0, bytes=0)
        timeline: list[tuple[int, str, float, float]] = []

        def record(rank, kind, start, end):
            if self.keep_timeline:
                timeline.append((rank, kind, start, end))

        def collective(duration: float, used: list[tuple[int, int]]):
            """A collective holds the links it uses for its duration."""
            reqs = [link_res[k].request() for k in used]
            yield env.all_of(reqs)
            yield env.timeout(duration)
            for k, r in zip(used, reqs):
                link_res[k].release(r)

        ring_links = [(i, (i + 1) % p) for i in range(p)] if p > 1 else []
        gather_seconds = cache(lambda n: (self.one_round_seconds if w.method.exchange == "direct" else
                                          self.allgather_seconds)(n, list(range(p))))
        async_refresh = self.async_gathers_seconds() if w.method.stale_kv else 0.0
        compute = {local: [self.layer_compute(r, local) for r in range(p)] for local in (False, True)}
        step_bytes = {kind: 0 if kind == "local" else p * (p - 1) * L * w.kv_wire_bytes(kind == "sync")
                      for kind in ("local", "sync", "steady")}
        pending_async = None
        hidden = min(self.hidden_seconds(r) for r in range(p))
        per_rank = self.ranks_share_cores()
        lag = [0.0] * p

        def step_process(k: int):
            nonlocal pending_async, lag
            warm = k < w.warmup_steps
            local = warm and w.warmup_mode == "local"
            enc, dec = self.codec_seconds(warm or local)
            codec = enc + (p - 1) * dec
            start = env.now
            gather = w.gather_bytes(k)
            stats["bytes"] += p * (p - 1) * gather
            if per_rank and not local:
                duration, lag, slowest, spans = self.step_per_rank(lag, warm, gather)
                yield env.timeout(duration)
                stats["compute"] += slowest
                stats["codec"] += L * codec
                stats["comm"] += duration - slowest - L * codec
                stats["bytes"] += step_bytes["sync" if warm else "steady"]
                timeline.extend((r, kind, start + a, start + b) for r, kind, a, b in spans)
                return
            lag = [0.0] * p
            comp = compute[local]
            exch = 0.0 if local else self.exchange_seconds(warm)
            if w.method.stale_kv and not warm:
                # compute this step with stale K/V while last step's gather may still be running
                compute_end = start + L * (max(comp) + codec)
                if pending_async is not None and not pending_async.triggered:
                    yield pending_async
                pending_async = env.process(collective(async_refresh, ring_links))
                yield env.timeout(max(0.0, compute_end - env.now))
            else:                                       # identical layers: one simulated, scaled by L
                yield env.timeout(L * (max(comp) + codec))
                if exch:                                # a direct exchange runs behind the own block
                    yield env.process(collective(L * max(0.0, exch - hidden), ring_links))
            out = gather_seconds(gather) if gather else 0.0
            if out:
                yield env.process(collective(out, ring_links))
            overhead = self.calib.devices[self.c.device].step_overhead_s * \
                self.calib.share(self.host_ranks, self.c.device)
            yield env.timeout(overhead)
            stats["compute"] += L * max(comp)
            stats["codec"] += L * codec
            stats["comm"] += (0 if w.method.stale_kv and not warm else L * max(0.0, exch - hidden)) + out
            stats["bytes"] += step_bytes["local" if local else "sync" if warm else "steady"]
            for r in range(p):
                record(r, "compute", start, start + L * comp[r])
                record(r, "codec", start + L * comp[r], start + L * (comp[r] + codec))
            for r in range(p):
                record(r, "comm", start + L * (max(comp) + codec), env.now)

        def generation():
            for k in range(w.steps):
                yield env.process(step_process(k))
            if pending_async is not None and not pending_async.triggered:
                yield pending_async

        env.process(generation())
        env.run()
        return Prediction(latency_s=env.now, compute_s=stats["compute"], comm_s=stats["comm"],
                          codec_s=stats["codec"], bytes_on_wire=stats["bytes"], timeline=timeline)

    def _pipefusion_run(self) -> Prediction:
        """PipeFusion (:mod:`.pipefusion`): a stage's layers on the host's shared cores (its ranks' sequence
        parallelism's exchanges added to each layer), activations over the links shard by shard."""
        w = self.w
        groups, layers = pipefusion.stage_groups(w), pipefusion.stage_layers(w.shape.layers, w.stages)
        u, r = w.degrees
        sp = u * r
        share = self.calib.share(self.host_ranks, self.c.device)

        def exchange(g: list[int], tokens: float) -> float:
            kv, t = pipefusion.shard_kv_bytes(w, tokens), 0.0
            if u > 1:
                t += max(self.alltoall_seconds(kv * 2, g[i:i + u]) for i in range(0, sp, u))
            if r > 1:
                t += max(self.allgather_seconds(kv / u, g[i::u]) for i in range(u))
            return t

        @cache                                          # a stage sees a few token counts, many times
        def stage_seconds(s: int, tokens: float) -> float:
            compute = max(self.c.compute_scale[x] for x in groups[s]) * self.calib.layer_seconds(
                tokens / sp, w.batch * w.tokens, w.shape.hidden, share, self.c.device)
            return layers[s] * (compute + exchange(groups[s], tokens))

        def send_seconds(a: int, b: int, nbytes: float) -> float:
            return max([self.c.exchange_floor_s] + [self.links.seconds(self.c.links[(x, y)], nbytes / sp)
                                                    for x, y in zip(groups[a], groups[b])])

        costs = pipefusion.Costs(stage_seconds, send_seconds,
                                 lambda s, tokens: pipefusion.stage_exchange_bytes(w, layers[s], tokens))
        latency, compute, wait, nbytes = pipefusion.simulate(w, costs, w.method.patches or w.stages)
        return Prediction(latency_s=latency, compute_s=compute, comm_s=wait, codec_s=0.0, bytes_on_wire=nbytes)

    def _cfg_run(self) -> Prediction:
        """CFG parallel (:mod:`.cfg`): each group simulated on its own ranks, then the partner exchange per step."""
        w, parts = self.w, cfg.groups(self.w)
        per_group = [Simulator(cfg.group_workload(w), self.c.subset(g), self.calib).run() for g in parts]
        pair = max(self.allgather_seconds(cfg.partner_bytes(w), [a, b]) for a, b in zip(*parts))
        return cfg.combined(w, per_group, pair)
