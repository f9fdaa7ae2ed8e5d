"""The SimPy model: byte counts agree with the runtime's accounting, costs move the right way with links,
nodes and methods, and calibration files round-trip."""


import pytest
from compactbed.netem.profiles import LinkSpec
from compactbed.scenarios.schema import METHOD_PRESETS, parse_scenario
from compactbed.simulator.costs import HOP_PARAMS, hop_seconds
from compactbed.simulator.model import Cluster, Simulator, cluster_of
from compactbed.simulator.predict import predict
from compactbed.simulator.workload import FLUX_DEV, HUNYUAN_VIDEO, workload_of

from .simulated import CALIB, run, sc


def test_predicted_bytes_equal_the_runtimes_exact_accounting():
    """Same formula the integration test asserts on real runs: (P-1) x layers x K/V shard per step, and the output
    gather after the last step (sharded latents) or after every step (``output_gather: step``)."""
    b, tokens = 16, 68 // 4
    kv = 2 * b * tokens * 128 * 4
    gather = b * 16 * 4 * 4 * 3
    latents = gather // 2                       # no guidance copy
    assert run(sc(labels=8, steps=3, guidance=1.5), "ring").bytes_on_wire == 4 * (3 * 3 * 4 * kv + latents)
    each = sc(labels=8, steps=3, guidance=1.5, output_gather="step")
    assert run(each, "ring").bytes_on_wire == 4 * 3 * (3 * 4 * kv + gather)


def test_compression_wins_on_slow_links_and_not_without_them():
    slow = sc(labels=128, warmup={"mode": "local", "steps": 1})
    fast = sc(link={"rate_mbit": None, "delay_ms": 0})
    assert run(slow, "compact-1bit").latency_s * 2.5 < run(slow, "ring").latency_s
    assert run(fast, "compact-1bit").latency_s >= run(fast, "ring").latency_s * 0.95
    assert run(slow, "compact-2bit").bytes_on_wire > run(slow, "compact-1bit").bytes_on_wire


def test_small_payloads_are_latency_bound():
    """32 images: each of the 15 hops per step pays an RTT; compressing further buys little."""
    s = sc(warmup={"mode": "local", "steps": 1})
    c1 = predict(s, CALIB)[0]
    by = {r.method: r for r in c1}
    assert by["compact-1bit"].latency_s < 1.10 * by["compact-1bit"].bound_s      # the rate barely matters
    assert by["compact-1bit"].comm_s > 0.5 * by["compact-1bit"].latency_s        # the delay does


def test_delay_and_rate_and_loss_each_cost_time():
    base = run(sc(), "ring").latency_s
    assert run(sc(link={"rate_mbit": 50, "delay_ms": 10}), "ring").latency_s > 1.5 * base
    assert run(sc(link={"rate_mbit": 100, "delay_ms": 40}), "ring").latency_s > base
    assert run(sc(link={"rate_mbit": 100, "delay_ms": 10, "loss_pct": 1}), "ring").latency_s > base


def test_heterogeneous_nodes_and_links():
    # 2 ranks, one core each: a slower node is slower. 4 ranks on 2 cores: a slower node also staggers the ranks,
    # which then share the cores less (see the core-sharing test), so only a much slower one is slower overall
    two = [{"name": "a"}, {"name": "b", "compute_scale": 3}]
    assert run(sc(nodes=two), "compact-1bit").latency_s > run(sc(nodes=2), "compact-1bit").latency_s
    base = run(sc(), "compact-1bit").latency_s
    slow_node = sc(nodes=[{"name": "a"}, {"name": "b", "compute_scale": 10}, {"name": "c"}, {"name": "d"}])
    assert run(slow_node, "compact-1bit").latency_s > base
    slow_link = sc(links=[{"src": 1, "dst": 2, "rate_mbit": 5, "delay_ms": 50}])
    assert run(slow_link, "ring").latency_s > run(sc(), "ring").latency_s


def test_warmup_modes():
    local = run(sc(warmup={"mode": "local", "steps": 2}), "compact-1bit")
    sync = run(sc(warmup={"mode": "sync", "steps": 2}), "compact-1bit")
    assert sync.bytes_on_wire > local.bytes_on_wire          # sync warmup sends full precision
    assert sync.latency_s > local.latency_s                  # ... which is what local warmup avoids on slow links


def test_distrifusion_hides_communication_behind_compute():
    s = sc(link={"rate_mbit": 1000, "delay_ms": 1})
    assert run(s, "distrifusion").latency_s < run(s, "patch").latency_s


def test_predict_table_and_published_shapes():
    rows, details = predict(sc(labels=128, warmup={"mode": "local", "steps": 1}), CALIB)
    by = {r.method: r for r in rows}
    assert by["ring"].speedup_vs_uncompressed == 1.0 and by["compact-1bit"].speedup_vs_uncompressed > 2
    assert all(r.bound_s <= r.latency_s * 1.0001 for r in rows)
    assert by["compact-1bit"].bytes_uncompressed > 20 * by["compact-1bit"].bytes_on_wire
    flux = parse_scenario(dict(name="f", nodes=8, model={"name": "flux.1-dev"}, resolution=1024, labels=1,
                               steps=28, guidance=1.0, methods=["ring", "compact-1bit"]), "f")
    w = workload_of(flux, METHOD_PRESETS["ring"])
    assert w.shape is FLUX_DEV and w.image_tokens == 4096 and w.local_tokens == (4096 + 512) // 8
    video = parse_scenario(dict(name="h", nodes=8, model={"name": "hunyuanvideo"}, resolution=1280, height=720,
                                frames=129, labels=1, steps=50, guidance=6.0, methods=["ulysses"]), "h")
    w = workload_of(video, METHOD_PRESETS["ulysses"])       # guidance-distilled: one sequence, no CFG batch
    assert w.shape is HUNYUAN_VIDEO and w.image_tokens == 33 * 45 * 80 and w.batch == 1 and video.video


def test_both_directions_penalty_grows_with_the_message():
    """A 2-rank ring loads both directions: a message of bidirectional_half_bytes pays half of the k_bidir
    penalty on its transfer, a much larger one nearly all of it, a tiny one almost none."""
    params = [getattr(CALIB, n) for n in HOP_PARAMS]
    params[HOP_PARAMS.index("hop_bidirectional_factor")] = 1.6
    params[HOP_PARAMS.index("bidirectional_half_bytes")] = 4e5
    rate, rtt = 10e6, 0.004

    def penalty(nbytes):
        one, both = (hop_seconds(params, rtt, nbytes, rate, b) - hop_seconds(params, rtt, 0.0, rate, b)
                     for b in (0, 1))
        return both / one

    assert penalty(4e5) == pytest.approx(1.3)
    assert penalty(4e8) == pytest.approx(1.6, rel=1e-3)
    assert penalty(4e2) == pytest.approx(1.0, abs=1e-3)


def test_distrifusion_async_gathers_overlap_in_pairs():
    """DistriFusion's refresh is L gathers per step. Gloo's two worker threads run two at once: the round trips
    overlap in pairs on any ring. On a 2-rank ring the async transfer factor scales the transfers (both directions
    loaded); larger rings pay a synchronous gather's transfers, the factor left out."""
    import dataclasses
    import math

    from compactbed.simulator.model import GLOO_THREADS

    assert GLOO_THREADS == 2
    for nodes in (2, 4):
        s = sc(nodes=nodes, link={"rate_mbit": 200, "delay_ms": 20}, methods=["distrifusion"])
        w = workload_of(s, METHOD_PRESETS["distrifusion"])
        base = Simulator(w, cluster_of(s), CALIB)
        L = w.shape.layers
        latency, exch = base.allgather_seconds(0.0, list(range(nodes))), base.exchange_seconds(False)
        assert latency > 0.04 and exch > latency
        pairs = math.ceil(L / 2)
        assert base.async_gathers_seconds() == pytest.approx(pairs * latency + L * (exch - latency))
        cheaper = Simulator(w, cluster_of(s), dataclasses.replace(CALIB, async_transfer_factor=0.5))
        k = 0.5 if nodes == 2 else 1.0
        assert cheaper.async_gathers_seconds() == pytest.approx(pairs * latency + L * k * (exch - latency))
        assert (cheaper.run().latency_s < base.run().latency_s) == (nodes == 2)


def test_distrifusion_async_loss_recovery_is_paid_in_full_on_two_ranks():
    """On a lossy 2-rank path the factor scales what the gathers' transfers cost without loss; what loss adds to
    them (recovery on the one connection each way) is paid in full."""
    import dataclasses
    import math

    link = {"rate_mbit": 100, "delay_ms": 10}
    lossy, clean = (sc(nodes=2, link=link | extra, methods=["distrifusion"]) for extra in ({"loss_pct": 0.2}, {}))
    w = workload_of(lossy, METHOD_PRESETS["distrifusion"])
    L, k = w.shape.layers, 0.5
    calib = dataclasses.replace(CALIB, async_transfer_factor=k, loss_constant=1.0, loss_rtts=1.0)
    sim = Simulator(w, cluster_of(lossy), calib)
    without = Simulator(w, dataclasses.replace(cluster_of(lossy), links=cluster_of(clean).links), calib)
    n = w.kv_wire_bytes(False)
    latency, transfer = sim.allgather_seconds(0.0, [0, 1], L), sim.allgather_seconds(n, [0, 1], L)
    lossless = without.allgather_seconds(n, [0, 1], L) - without.allgather_seconds(0.0, [0, 1], L)
    transfer -= latency
    assert 0 < lossless < transfer
    assert sim.async_gathers_seconds() == pytest.approx(math.ceil(L / 2) * latency + L * (k * lossless + transfer
                                                                                          - lossless))


def test_forwarding_limit_binds_only_on_the_emulation_host_with_offloads_off():
    """A lossy emulated cluster turns offloads off: its active links share the host's per-packet forwarding
    capacity. Clean links, real hosts and the GPU profile are not limited by it."""
    import dataclasses

    limited = dataclasses.replace(CALIB, forwarding_s_per_byte=1 / 20e6)       # 20 MB/s shared
    lossy = sc(link={"rate_mbit": 400, "delay_ms": 1, "loss_pct": 0.005}, methods=["ring"])   # paths: 2 ms, ~0.01%
    clean = sc(link={"rate_mbit": 400, "delay_ms": 1}, methods=["ring"])
    assert cluster_of(lossy).forwarding and not cluster_of(clean).forwarding
    assert not cluster_of(lossy, device="l20").forwarding
    w = workload_of(lossy, METHOD_PRESETS["ring"])
    free = Simulator(w, cluster_of(lossy), CALIB).run().comm_s
    capped = Simulator(w, cluster_of(lossy), limited).run().comm_s
    # 4 links share 20 MB/s: each gets 5 MB/s instead of ~50 MB/s, so the bulk transfer takes ~10x longer
    assert capped > 5 * free
    w_clean = workload_of(clean, METHOD_PRESETS["ring"])
    assert Simulator(w_clean, cluster_of(clean), limited).run().comm_s == \
        pytest.approx(Simulator(w_clean, cluster_of(clean), CALIB).run().comm_s)


def test_shared_uplink_slows_all_to_all():
    s = sc(methods=["ulysses"])
    w = workload_of(s, METHOD_PRESETS["ulysses"])
    links = cluster_of(s).links
    own = Simulator(w, Cluster((1.0,) * 4, links), CALIB).run().latency_s
    shared = Simulator(w, Cluster((1.0,) * 4, links, shared_uplink=True), CALIB).run().latency_s
    assert shared > own


def test_oversubscribed_hosts_pay_a_scheduling_wait_per_hop():
    """4 ranks on the 2-core profile: every hop waits k_sched x (share - 1); 2 ranks (one per core) do not. (Links
    fast enough that every hop is latency: a large message's halves would hide part of it behind transfers.)"""
    import dataclasses

    waiting = dataclasses.replace(CALIB, oversubscribed_hop_s=0.01)
    for nodes, extra_per_hop in ((4, 0.01), (2, 0.0)):
        s = sc(nodes=nodes, methods=["ring"], link={"delay_ms": 10})
        w = workload_of(s, METHOD_PRESETS["ring"])
        hops = (s.steps * w.shape.layers + 1) * (nodes - 1)        # K/V hops per layer + the output gather
        base = Simulator(w, cluster_of(s), CALIB).run().comm_s
        assert Simulator(w, cluster_of(s), waiting).run().comm_s - base == pytest.approx(hops * extra_per_hop)


def test_an_exchange_costs_no_less_than_the_hosts_probed_floor():
    """A probed floor of 20 ms per exchange (``Cluster.exchange_floor_s``): on a fast link each operation of the
    ring's all-gather takes it (two in flight: P-1 floors) and a direct round takes one; on a link slower than the
    floor every cost is the link's alone."""
    import dataclasses

    for link, floored in (({"rate_mbit": 1000, "delay_ms": 0.1}, True), ({"rate_mbit": 10, "delay_ms": 50}, False)):
        s = sc(link=link)
        w, ring = workload_of(s, METHOD_PRESETS["ring"]), [0, 1, 2, 3]
        n = w.kv_wire_bytes(False)
        base = Simulator(w, cluster_of(s), CALIB)
        probed = Simulator(w, dataclasses.replace(cluster_of(s), exchange_floor_s=0.02), CALIB)
        if floored:
            assert base.allgather_seconds(n, ring) < 0.02 and base.one_round_seconds(n, ring) < 0.02
            assert probed.allgather_seconds(n, ring) == pytest.approx(3 * 0.02)
            assert probed.one_round_seconds(n, ring) == pytest.approx(0.02)
        else:
            assert probed.allgather_seconds(n, ring) == base.allgather_seconds(n, ring)
            assert probed.one_round_seconds(n, ring) == base.one_round_seconds(n, ring)


def test_predict_prices_every_exchange_at_no_less_than_a_given_floor():
    """``predict(..., exchange_floor_s)`` (``scenario predict --probe-host``): on a fast link a ring's comm becomes
    its exchanges times the floor."""
    s = sc(nodes=2, link={"rate_mbit": 1000, "delay_ms": 0.1}, labels=2, methods=["ring"])
    w = workload_of(s, METHOD_PRESETS["ring"])
    exchanges = s.steps * w.shape.layers + 1                     # one hop per layer on 2 ranks + the output gather
    (plain,), _ = predict(s, CALIB)
    (floored,), _ = predict(s, CALIB, exchange_floor_s=0.05)
    assert plain.comm_s < exchanges * 0.02
    assert floored.comm_s == pytest.approx(exchanges * 0.05, rel=0.05)
    assert floored.bound_s > plain.bound_s


def test_predict_scales_compute_by_a_given_host_factor():
    """``predict(..., host_factor)`` (``scenario predict --probe-host``, the host's measured pace): a host twice as
    slow computes twice as long; the links' costs stay."""
    s = sc(nodes=2, link={"rate_mbit": 10, "delay_ms": 20}, labels=2, methods=["ring"])
    (plain,), _ = predict(s, CALIB)
    (slow,), _ = predict(s, CALIB, host_factor=2.0)
    assert slow.compute_s == pytest.approx(2 * plain.compute_s, rel=1e-6)
    assert slow.latency_s > plain.latency_s + 0.5 * plain.compute_s
    assert slow.bytes_on_wire == plain.bytes_on_wire


def test_ring_all_gather_on_a_link_mix():
    """gloo's ring: a receiver posts each round's receive only once the previous one is in, and a send starts on
    the receiver's notice, so every round waits for the slowest hop; a slow link's transfers queue one after
    another (it carries P-1 chunks)."""
    s = sc(methods=["ring"])
    w = workload_of(s, METHOD_PRESETS["ring"])
    ring = list(range(4))

    def gather(slow: LinkSpec, fast: LinkSpec, nbytes: float) -> tuple[float, float, float]:
        links = {(i, j): fast for i in range(4) for j in range(4) if i != j} | {(1, 2): slow}
        sim = Simulator(w, Cluster((1.0,) * 4, links, device="cpu"), CALIB)
        return sim.allgather_seconds(nbytes, ring), sim.links.seconds(slow, nbytes), sim.links.seconds(fast, nbytes)

    # latency-bound: unlimited rate, one long link; each of the 3 rounds waits for it
    t, slow_hop, fast_hop = gather(LinkSpec(delay_ms=20), LinkSpec(delay_ms=1), 1000)
    assert t == pytest.approx(3 * slow_hop)
    assert fast_hop < slow_hop / 5
    # bandwidth-bound: the 10 Mbit link carries 3 chunks back to back
    t, slow_hop, fast_hop = gather(LinkSpec(rate_mbit=10), LinkSpec(rate_mbit=1000), 1.25e6)
    assert 3 * (slow_hop - CALIB.hop_overhead_s) <= t < 3 * slow_hop + fast_hop
    # uniform links: (P-1) x one hop for an empty message; a large one's halves hide some latency behind transfers
    uniform = LinkSpec(rate_mbit=100, delay_ms=5)
    t, _, hop = gather(uniform, uniform, 0)
    assert t == pytest.approx(3 * hop)
    t, _, hop_2e5 = gather(uniform, uniform, 2e5)
    assert 3 * (hop_2e5 - hop) + hop < t < 3 * hop_2e5


def test_a_late_rank_holds_up_the_gather_of_its_predecessor():
    """gloo's rendezvous: nobody sends to a rank before it has entered the all-gather, so a late entry delays every
    rank's exit, the late rank's own last."""
    s = sc(methods=["ring"])
    sim = Simulator(workload_of(s, METHOD_PRESETS["ring"]), cluster_of(s), CALIB)
    on_time = sim.allgather_exits(1000, [0.0] * 4)
    hop = on_time[0] / 3                                    # uniform links, small message: (P-1) x one hop
    late = sim.allgather_exits(1000, [0.0, 0.0, 0.0, 0.5])
    # rank 3's chunk leaves at 0.5 and reaches rank 0 after a hop, rank 1 after two; rank 3 itself receives only
    # once it has posted, so it ends a whole gather after its entry, last
    assert late[0] > 0.5 + hop and late[1] == pytest.approx(0.5 + 2 * hop, rel=1e-3) and late[2] > 0.5 + 2 * hop
    assert late[3] == pytest.approx(0.5 + on_time[3]) == max(late)


def test_processor_sharing():
    from compactbed.simulator.model import processor_sharing

    assert processor_sharing([0, 0, 0, 0], [1, 1, 1, 1], 2) == pytest.approx([2, 2, 2, 2])
    assert processor_sharing([0, 0, 1, 1], [1, 1, 1, 1], 2) == pytest.approx([1, 1, 2, 2])
    # 3 jobs on 2 cores run at 2/3 until the short one ends, then at full speed
    assert processor_sharing([0, 0, 0], [1, 2, 2], 2) == pytest.approx([1.5, 2.5, 2.5])
    assert processor_sharing([5.0], [1.0], 2) == [6.0]


def test_ranks_on_shared_cores_compute_less_than_lockstep_on_a_link_mix():
    """4 ranks on 2 cores: in lockstep (uniform links) each layer's compute is 2x one core's; behind a slower node
    the ranks leave each gather at different times, compute with fewer others, and the slowest is below 2x."""
    def compute_per_layer(**kw):
        s = sc(methods=["compact-1bit"], steps=5, warmup={"mode": "sync", "steps": 1}, **kw)
        w = workload_of(s, METHOD_PRESETS["compact-1bit"])
        sim = Simulator(w, cluster_of(s), CALIB)
        assert sim.ranks_share_cores()
        one_core = CALIB.layer_seconds(w.local_tokens, w.batch * w.tokens, w.shape.hidden, 1.0, "cpu")
        return sim.run().compute_s / (5 * w.shape.layers * one_core)

    assert compute_per_layer() == pytest.approx(2.0)
    slow = [{"src": a, "dst": b, "rate_mbit": 50, "delay_ms": 20} for k in (0, 2, 3) for a, b in ((1, k), (k, 1))]
    assert compute_per_layer(links=slow) < 1.9


def test_shaper_burst_only_on_htb_shaped_links():
    import dataclasses

    from compactbed.simulator.model import LinkModel

    calib = dataclasses.replace(CALIB, burst_factor=1.0)
    link = LinkSpec(rate_mbit=100, delay_ms=1)                     # htb burst: 32 KB
    shaped, end_to_end = LinkModel(calib), LinkModel(calib, htb_shaped=False)
    assert shaped.seconds(link, 30_000) == pytest.approx(shaped.seconds(link, 0.0))
    assert end_to_end.seconds(link, 30_000) - end_to_end.seconds(link, 0.0) == \
        pytest.approx(30_000 / calib.effective_rate_bytes(link))


def test_campaign_design_spreads_valid_scenarios_over_the_link_space():
    """A Latin-hypercube campaign: every design is a valid scenario, the same seed gives the same designs, both
    node counts, lossless and lossy links and a link mix appear, and the time budget halves the image count."""
    from compactbed.simulator.design import design, predicted_seconds

    designs = design("t", 12, seed=5)
    assert design("t", 12, seed=5) == designs and design("t", 12, seed=6) != designs
    scenarios = [parse_scenario(d, "t") for d in designs]
    assert {s.world_size for s in scenarios} == {2, 4}
    assert any(s.link.loss_pct for s in scenarios) and any(not s.link.loss_pct for s in scenarios)
    mixed = [s for d, s in zip(designs, scenarios) if d.get("links")]
    assert mixed and all(s.link_between(1, 0).rate_mbit < s.link_between(0, 2).rate_mbit for s in mixed)
    for d in designs:
        assert 40 <= d["link"]["rate_mbit"] <= 500 and 1 <= d["link"]["delay_ms"] <= 25
    (big,) = design("t", 1, seed=5)
    (small,) = design("t", 1, seed=5, budget_s=predicted_seconds(big) / 2)
    assert small["labels"] < big["labels"]
    assert predicted_seconds(small) <= predicted_seconds(big) / 2 or small["labels"] <= 32
    with pytest.raises(ValueError):
        design("t", 0, seed=1)


def test_round_trips_are_priced_per_congestion_control():
    """A scenario's algorithm scales the hop model's round trips by its measured factor; "host" and the
    calibration's own algorithm (and one never measured) are priced as fitted."""
    import dataclasses

    calib = dataclasses.replace(CALIB, congestion_control="bbr", rtt_factor_by_algorithm={"reno": 0.5})
    by = {}
    for cc in ("host", "bbr", "vegas", "reno"):
        s = sc(congestion_control=cc, methods=["compact-1bit"])
        assert cluster_of(s).congestion_control == cc
        by[cc] = Simulator(workload_of(s, METHOD_PRESETS["compact-1bit"]), cluster_of(s), calib).run().comm_s
    assert by["host"] == by["bbr"] == by["vegas"]
    assert by["reno"] < 0.8 * by["bbr"]              # latency-bound: half the round trips
    assert calib.hop_params("cpu", "reno")[0] == 0.5 * calib.hop_params()[0]


def test_loss_bounds_a_loss_based_algorithm_by_mathis_and_not_bbr():
    """On a lossy link, reno halves its window at each loss (simulator.tcp's AIMD sender), whatever was fitted under
    the calibration's BBR, which does not back off on random loss: a bulk ring then takes several times as long. The
    closed-form hop model (what the hop fits and the regression's exchange ratio use) caps reno at
    sqrt(3/2) MSS / (RTT sqrt(p)) (Mathis)."""
    import dataclasses

    from compactbed.simulator.costs import LOSS_BASED_C, MSS

    calib = dataclasses.replace(CALIB, congestion_control="bbr", loss_constant=16.0, rtt_factor_by_algorithm={})
    assert calib.loss_constant_for("reno") == LOSS_BASED_C["reno"] == pytest.approx(1.2247, abs=1e-4)
    assert calib.loss_constant_for("host") == calib.loss_constant_for("bbr") == 16.0
    link = {"rate_mbit": 200, "delay_ms": 6, "loss_pct": 0.2}
    by = {cc: Simulator(workload_of(s := sc(congestion_control=cc, link=link, methods=["ring"]),
                                    METHOD_PRESETS["ring"]), cluster_of(s), calib).run() for cc in ("bbr", "reno")}
    assert by["reno"].comm_s > 3 * by["bbr"].comm_s
    params = dict(zip(HOP_PARAMS, calib.hop_params("cpu", "reno")))
    lossy = dict(rtt=0.024, nbytes=4e6, rate=200e6 / 8, loss=0.004)
    mathis = LOSS_BASED_C["reno"] * MSS / (0.024 * 0.004 ** 0.5)
    hop = tuple(params.values())
    transfer = hop_seconds(hop, **lossy) - hop_seconds(hop, **(lossy | {"nbytes": 0}))
    assert transfer == pytest.approx(params["hop_bandwidth_factor"] * 4e6 / mathis
                                     + params["loss_rtts"] * 0.004 * 4e6 / MSS * 0.024, rel=0.02)


def test_a_star_shares_the_uplink_a_mesh_does_not():
    s = sc(methods=["ulysses"])
    mesh = s.model_copy(update={"topology": "mesh"})
    assert cluster_of(s).shared_uplink and not cluster_of(mesh).shared_uplink
    assert cluster_of(s).links == cluster_of(mesh.model_copy(update={"link": s.link.then(s.link)})).links


def test_a_direct_exchange_is_one_round_partly_behind_the_own_block():
    """compact-1bit on a latency-bound star: the direct exchange costs one round instead of P-1, with the same
    bytes; on the ring pattern its own attention block hides part of it (patch has no such block)."""
    s = sc(methods=["compact-1bit", "compact-1bit-direct"], warmup={"mode": "local", "steps": 1})
    ring, direct = run(s, "compact-1bit"), run(s, "compact-1bit-direct")
    assert direct.bytes_on_wire == ring.bytes_on_wire
    assert direct.comm_s < 0.6 * ring.comm_s and direct.latency_s < ring.latency_s
    w = workload_of(s, METHOD_PRESETS["compact-1bit-direct"])
    sim = Simulator(w, cluster_of(s), CALIB)
    assert sim.hidden_seconds(0) > 0
    assert sim.exchange_seconds(False) == pytest.approx(sim.one_round_seconds(w.kv_wire_bytes(False), [0, 1, 2, 3]))
    patch = METHOD_PRESETS["compact-1bit-patch"].model_copy(update={"exchange": "direct"})
    assert Simulator(workload_of(s, patch), cluster_of(s), CALIB).hidden_seconds(0) == 0


def test_a_lossy_ring_under_reno_waits_for_its_slowest_link_and_distrifusion_for_its_slowest_run():
    """Reno on a lossy star: a ring round waits for the slowest of its P messages (order statistics of the AIMD
    sender's message times), so a ring hop costs more than one connection's mean; DistriFusion's L gathers of a
    step, queued back to back, wait for the slowest connection's run of L messages: less per gather."""
    import dataclasses

    from compactbed.simulator.model import LinkModel
    from compactbed.simulator.tcp import slowest_extra_seconds

    calib = dataclasses.replace(CALIB, congestion_control="bbr", rtt_factor_by_algorithm={})
    spec = LinkSpec(rate_mbit=100, delay_ms=20, loss_pct=0.2)
    reno, bbr = LinkModel(calib, congestion_control="reno"), LinkModel(calib, congestion_control="bbr")
    one, four = reno.seconds(spec, 150e3, parallel=1), reno.seconds(spec, 150e3, parallel=4)
    assert bbr.seconds(spec, 150e3, parallel=4) == bbr.seconds(spec, 150e3, parallel=1)    # BBR: no change
    assert four > one > reno.seconds(LinkSpec(rate_mbit=100, delay_ms=20), 150e3)
    rtt = 2 * (0.02 + calib.link_overhead_s)
    rate = calib.effective_rate_bytes(spec)
    assert four - one == pytest.approx(slowest_extra_seconds(rtt, 0.002, 150e3, rate, 4)
                                       - slowest_extra_seconds(rtt, 0.002, 150e3, rate, 1))
    assert reno.seconds(spec, 150e3, parallel=4, consecutive=8) < four
    s = sc(congestion_control="reno", link={"rate_mbit": 100, "delay_ms": 10, "loss_pct": 0.1}, methods=["ring"])
    w = workload_of(s, METHOD_PRESETS["distrifusion"])
    sim = Simulator(w, cluster_of(s), calib)
    gathers = sim.async_gathers_seconds()
    assert gathers < w.shape.layers * sim.allgather_seconds(w.kv_wire_bytes(False), [0, 1, 2, 3])


def test_loss_is_priced_over_the_messages_a_run_sends_on_each_connection():
    """A 4-rank ring sends P-1 hops per layer on each connection, a direct exchange one round per layer, and a
    local warmup step (compact's, not the ring's) nothing; the runtime gathers the output once, at the end. A
    longer run carries more messages on the same connections, so at low loss its messages settle nearer the
    long-run window: each costs more on average."""
    import dataclasses

    from compactbed.simulator.model import LinkModel

    s = sc(steps=8, warmup={"mode": "local", "steps": 1}, methods=["ring", "compact-1bit-direct"])
    layers = workload_of(s, METHOD_PRESETS["ring"]).shape.layers
    ring, direct = (workload_of(s, s.methods[i]) for i in range(2))
    assert not ring.gather_each_step and ring.warmup_steps == 0 and direct.warmup_steps == 1
    assert ring.connection_messages == 8 * layers * 3
    assert direct.connection_messages == 7 * layers
    calib = dataclasses.replace(CALIB, congestion_control="bbr", rtt_factor_by_algorithm={})
    spec = LinkSpec(rate_mbit=500, delay_ms=40, loss_pct=0.02)
    short, long = (LinkModel(calib, congestion_control="reno", run_messages=n) for n in (30, 600))
    assert LinkModel(calib, congestion_control="reno").seconds(LinkSpec(rate_mbit=500, delay_ms=40), 278528) < \
        short.seconds(spec, 278528, parallel=2) < long.seconds(spec, 278528, parallel=2)
    sim = Simulator(ring, cluster_of(s), calib)
    assert sim.links.run_messages == ring.connection_messages
