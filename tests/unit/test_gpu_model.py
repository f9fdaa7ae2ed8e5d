"""The GPU-cluster model: collectives follow their link profiles, machines share their NIC, profiles round-trip
through their files, and published sets are predicted from their single-device anchor only."""

from dataclasses import replace

import pytest
from compactbed.scenarios.schema import ScenarioError, parse_scenario
from compactbed.simulator.collectives import Fabric, allgather_seconds, alltoall_seconds, sendrecv_seconds
from compactbed.simulator.gpu import GpuSimulator, efficiency, gpu_cluster_of, layer_seconds
from compactbed.simulator.hardware import (Anchor, read_devices, read_links, shipped, write_devices,
                                           write_links)
from compactbed.simulator.predict import predict
from compactbed.simulator.published import disagreement, disagreements, published_sets
from compactbed.simulator.workload import FLUX_DEV, image_tokens, workload_of

from .simulated import CALIB

P = shipped()
NVLINK, ETH = P.links["nvlink4"], P.links["ethernet_25g"]


def fabric(machines: int, gpus: int, intra=NVLINK, nic=ETH) -> Fabric:
    return Fabric(tuple(r // gpus for r in range(machines * gpus)), intra, (nic,) * machines)


def flux(nodes: int, methods, **kw) -> object:
    data = dict(name="g", nodes=nodes, model={"name": "flux.1-dev"}, resolution=1024, steps=28, guidance=3.5,
                labels=1, methods=methods, warmup={"mode": "sync", "steps": 1}) | kw
    return parse_scenario(data)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("nbytes", [1e3, 1e6, 1e8])
def test_allgather_follows_the_profile_in_message_size_and_rank_count(p, nbytes):
    """nccl-tests' form: (P-1) steps of one latency, n (P-1) bytes at the bus bandwidth."""
    f = fabric(1, p)
    t = allgather_seconds(f, nbytes, list(range(p)))
    assert t == pytest.approx((p - 1) * (NVLINK.latency_us * 1e-6 + nbytes / (NVLINK.busbw_gbs * 1e9)))
    assert allgather_seconds(f, 2 * nbytes, list(range(p))) - t == pytest.approx(
        (p - 1) * nbytes / (NVLINK.busbw_gbs * 1e9))


def test_cross_machine_pairs_go_through_the_shared_nic():
    f = fabric(2, 4)
    assert f.pair(0, 1) == (NVLINK.busbw_gbs * 1e9, NVLINK.latency_us * 1e-6)
    assert f.pair(0, 4) == (ETH.busbw_gbs * 1e9, ETH.latency_us * 1e-6)
    n = 1e8
    # the ring crosses both NICs: every step at the NIC's rate
    assert allgather_seconds(f, n, list(range(8))) == pytest.approx(7 * (ETH.latency_us * 1e-6 + n / (ETH.busbw_gbs * 1e9)))
    # an all-to-all's cross-machine bytes of all 4 GPUs leave through one NIC
    cross = 4 * 4 * n / 8 / (ETH.busbw_gbs * 1e9)
    assert alltoall_seconds(f, n, list(range(8))) == pytest.approx(ETH.latency_us * 1e-6 + cross)
    # one pair across the NIC alone, or four at once sharing it
    one = sendrecv_seconds(f, n, [(0, 4)])
    four = sendrecv_seconds(f, n, [(r, r + 4) for r in range(4)])
    assert four - ETH.latency_us * 1e-6 == pytest.approx(4 * (one - ETH.latency_us * 1e-6))
    assert sendrecv_seconds(f, n, [(0, 1)]) < one / 40


def test_a_lone_send_recv_pair_reaches_the_p2p_bandwidth_and_a_collective_the_bus_bandwidth():
    """NCCL gives a peer few channels: on NVLink one send/recv pair runs at the class's P2P bandwidth (nccl-tests
    sendrecv_perf), well below the all-gather's bus bandwidth; a class without a P2P figure sends at its busbw."""
    f, n = fabric(1, 4), 1e8
    assert NVLINK.p2p_gbs and NVLINK.p2p_gbs < NVLINK.busbw_gbs / 2 and NVLINK.p2p_source
    assert sendrecv_seconds(f, n, [(0, 1)]) == pytest.approx(NVLINK.latency_us * 1e-6 + n / (NVLINK.p2p_gbs * 1e9))
    assert allgather_seconds(f, n, [0, 1]) == pytest.approx(NVLINK.latency_us * 1e-6 + n / (NVLINK.busbw_gbs * 1e9))
    pcie = P.links["pcie4"]
    assert sendrecv_seconds(fabric(1, 4, intra=pcie), n, [(0, 1)]) == pytest.approx(
        pcie.latency_us * 1e-6 + n / (pcie.busbw_gbs * 1e9))


def test_ring_attention_merges_its_blocks_and_waits_for_its_hops_on_nvlink():
    """xDiT's blockwise attention keeps its output in fp32 and merges each further block (one memory pass of the
    output); on 4 x H100 a FLUX ring hop (7 MB of K and of V at the P2P rate) outlasts the block it hides behind,
    so the ring is slower than Ulysses' two all-to-alls, as xDiT's FLUX table has it."""
    sc = flux(4, ["ring", "ulysses"], hardware={"device": "h100-sxm", "gpus_per_node": 4, "intra_node": "nvlink4"})
    sims = {m.name: GpuSimulator(workload_of(sc, m), gpu_cluster_of(sc)) for m in sc.methods}
    w, hbm = sims["ring"].w, P.devices["h100-sxm"].hbm_gbs * 1e9
    assert sims["ring"].merge("merge") == pytest.approx(w.local_tokens * w.shape.hidden * (4 + 2 + 4) / hbm)
    ring, ulysses = (sims[m].denoise() for m in ("ring", "ulysses"))
    assert ring.latency_s > 1.2 * ulysses.latency_s and ring.comm_s > 3 * ulysses.comm_s
    assert ring.compute_s - ulysses.compute_s == pytest.approx(3 * 28 * 57 * sims["ring"].merge("merge"), rel=0.2)


def test_a_cluster_of_machines_is_slower_than_one_machine_and_faster_with_a_faster_nic():
    sc = flux(8, ["ring"], hardware={"device": "h100-sxm", "gpus_per_node": 8, "intra_node": "nvlink4"})
    w = workload_of(sc, sc.methods[0])
    one = GpuSimulator(w, gpu_cluster_of(sc)).run().latency_s
    two = gpu_cluster_of(sc.model_copy(update={"hardware": sc.hardware.model_copy(update={"gpus_per_node": 4,
                                                                                          "inter_node": "ethernet_25g"})}))
    slow = GpuSimulator(w, two).run().latency_s
    ib = GpuSimulator(w, replace(two, fabric=replace(two.fabric, nic=(P.links["ib_ndr"],) * 2))).run().latency_s
    assert one < ib < slow


def test_compute_reproduces_the_single_device_anchor_and_scales_with_ranks():
    l20 = P.devices["l20"]
    anchor = next(a for a in l20.anchors if a.model == "flux.1-dev")
    single = flux(1, ["ring"], hardware={"device": "l20"})
    t1 = GpuSimulator(workload_of(single, single.methods[0]), gpu_cluster_of(single)).run()
    assert t1.latency_s == pytest.approx(anchor.seconds, rel=1e-3) and t1.comm_s == 0
    eff = efficiency(l20, "flux.1-dev")[0]
    assert 0.2 < eff < 1.0
    tokens = image_tokens(FLUX_DEV, 1024) + FLUX_DEV.text_tokens
    # wave quantization: a quarter of the tokens takes more than a quarter of the time
    quarter = layer_seconds(l20, eff, tokens / 4, tokens, FLUX_DEV.hidden, FLUX_DEV.heads)
    whole = layer_seconds(l20, eff, tokens, tokens, FLUX_DEV.hidden, FLUX_DEV.heads)
    assert 0.25 * whole < quarter < 0.35 * whole
    # a device without a published time takes the median efficiency of those with one
    assert "median" in efficiency(P.devices["a100-sxm"], "flux.1-dev")[1]


def test_compression_pays_on_slow_links_and_distrifusion_hides_its_gathers_on_fast_ones():
    slow = flux(4, ["ring", "compact-1bit", "distrifusion"], link={"rate_mbit": 4000},
                hardware={"device": "l20"})
    rows = {r.method: r for r in predict(slow, CALIB)[0]}
    assert rows["compact-1bit"].latency_s * 5 < rows["ring"].latency_s
    assert rows["compact-1bit"].bytes_on_wire * 8 < rows["ring"].bytes_on_wire
    fast = flux(4, ["ring", "distrifusion"], hardware={"device": "h100-sxm", "gpus_per_node": 4,
                                                       "intra_node": "nvlink4"})
    rows = {r.method: r for r in predict(fast, CALIB)[0]}
    assert rows["distrifusion"].comm_s < 0.02 * rows["distrifusion"].latency_s


def test_asynchronous_gathers_and_the_next_exchange_contend_for_the_nic():
    """DistriFusion's gathers hold the NIC: on a link too slow to hide them, a step waits for the last one."""
    sc = flux(4, ["distrifusion"], link={"rate_mbit": 800}, hardware={"device": "l20"})
    p = GpuSimulator(workload_of(sc, sc.methods[0]), gpu_cluster_of(sc)).run()
    assert p.comm_s > 0.5 * p.latency_s


def test_hardware_names_are_checked_with_the_shipped_choices(tmp_path):
    sc = flux(4, ["ring"], hardware={"device": "h900"})
    with pytest.raises(ScenarioError, match="no device profile 'h900'; shipped: h100-sxm"):
        predict(sc, CALIB)
    sc = flux(4, ["ring"], hardware={"device": "l20", "inter_node": "nvlink4"})
    with pytest.raises(ScenarioError, match="between machines"):
        predict(sc, CALIB)
    with pytest.raises(ScenarioError, match="no device profile 'tpu'"):
        predict(flux(4, ["ring"]), CALIB, "tpu")
    # --device picks a GPU for a scenario without hardware: one per machine behind the scenario's links
    rows = predict(flux(4, ["ring"], link={"rate_mbit": 4000}), CALIB, "h100-sxm")[0]
    assert rows[0].latency_s > 100        # 4 Gbit/s links dominate
    with pytest.raises(ScenarioError, match="tiny model makes square images"):
        parse_scenario(dict(name="t", nodes=2, methods=["ring"], frames=9))


def test_profiles_round_trip_through_their_files(tmp_path):
    write_devices(P.devices, tmp_path / "d.yaml")
    write_links(P.links, tmp_path / "l.yaml")
    assert read_devices(tmp_path / "d.yaml") == P.devices
    assert read_links(tmp_path / "l.yaml") == P.links
    for entry in [*P.devices.values(), *P.links.values()]:
        assert len(entry.source) > 20, entry.name
    assert {"h100-sxm", "h200", "a100-sxm", "a100-pcie", "l40", "l40s", "l20", "h20", "rtx4090"} <= set(P.devices)
    assert {"nvlink3", "nvlink4", "pcie4", "pcie4_p2p", "pcie5", "pcie5_p2p", "ethernet_10g", "ethernet_25g",
            "ethernet_100g", "ethernet_200g", "ethernet_400g", "roce_10g", "roce_25g", "roce_100g", "roce_200g",
            "roce_400g", "ib_hdr", "ib_ndr"} <= set(P.links)
    bad = tmp_path / "bad.yaml"
    bad.write_text("x: {scope: bus, busbw_gbs: 1, latency_us: 1, source: s}")
    with pytest.raises(ValueError, match="scope is intra or nic"):
        read_links(bad)


def test_published_sets_are_predicted_from_their_single_device_time_only():
    sets = {s.name: s for s in published_sets()}
    assert "compactfusion_pcie" in sets and "xdit_flux_h100" in sets
    for s in sets.values():
        assert s.source and s.rows
        for r in s.rows:
            assert r.predicted_s > 0 and r.published_s > 0
    # the anchor is the set's own: a set whose single-device time doubles predicts slower compute
    eth = sets["compactfusion_ethernet_500"]
    assert {r.label for r in eth.rows} >= {"ring", "compact-1bit", "ulysses"}
    a = Anchor(model="flux.1-dev", resolution=1024, steps=28, seconds=23.16, source="s", outside=False)
    l20 = replace(P.devices["l20"], anchors=(a,))
    assert efficiency(replace(l20, anchors=(replace(a, seconds=46.32),)), "flux.1-dev")[0] == pytest.approx(
        efficiency(l20, "flux.1-dev")[0] / 2, rel=1e-3)


def test_two_publications_of_one_configuration_are_compared_row_by_row(tmp_path):
    """A rerun set is set against the set it reruns on the rows both publish: its seconds and speedups over theirs."""
    sets = {s.name: s for s in published_sets(only=["xdit_flux_h100_compiled", "xdit_flux_h100_compiled_rerun"])}
    (d,) = disagreements(list(sets.values()))
    assert (d.set, d.rerun_of, d.rows) == ("xdit_flux_h100_compiled_rerun", "xdit_flux_h100_compiled", 5)
    assert d.latency[0] == pytest.approx(4.01 / 2.68 - 1)          # Ulysses on 2 GPUs: 4.01 s against 2.68 s
    assert d.speedup[0] == pytest.approx((3.88 / 4.01) / (4.30 / 2.68) - 1)
    assert d.latency_max == pytest.approx(2.85 / 1.80 - 1)
    original, rerun = sets["xdit_flux_h100_compiled"], sets["xdit_flux_h100_compiled_rerun"]
    with pytest.raises(ValueError, match="share no row"):
        disagreement(replace(rerun, rows=rerun.rows[:1]), replace(original, rows=original.rows[1:]))
    bad = tmp_path / "published.yaml"
    bad.write_text("a: {rerun_of: b, rows: []}\n")
    with pytest.raises(KeyError, match="rerun_of names no set: a"):
        published_sets(bad)


def test_the_text_encoders_and_vae_add_alike_to_every_configuration_and_are_part_of_the_anchor():
    """The stages outside the denoiser run whole on every rank: they add the same seconds to one GPU and to four,
    the single-device anchor's time includes them (so compute is fitted to the rest), and the VAE's efficiency
    reproduces its own published decode time."""
    from compactbed.simulator import stages

    one, four = flux(1, ["ring"], hardware={"device": "l20"}), flux(4, ["ring"], hardware={"device": "l20"})
    sims = [GpuSimulator(workload_of(s, s.methods[0]), gpu_cluster_of(s)) for s in (one, four)]
    extra = [sim.run().latency_s - sim.denoise().latency_s for sim in sims]
    assert extra[0] == pytest.approx(extra[1]) and extra[0] == pytest.approx(sims[0].outside()) and extra[0] > 0.1
    a = next(x for x in P.devices["l20"].anchors if x.model == "flux.1-dev")
    assert efficiency(P.devices["l20"], "flux.1-dev")[0] > efficiency(
        replace(P.devices["l20"], anchors=(replace(a, outside=False),)), "flux.1-dev")[0]
    for model in stages.PIPELINES:          # the shipped counts are what the published configs count to now
        shipped_counts = stages.counts()[model]
        vae = shipped_counts["vae"]
        assert stages.count_vae(model) == pytest.approx((vae["flops"], vae["bytes"]))
        assert stages.count_text_encoders(model) == pytest.approx(shipped_counts["text_encoder_flops"])
    flops, nbytes = stages.vae_decode_cost("flux.1-dev", 1024, 1024)
    assert stages.vae_decode_cost("flux.1-dev", 2048, 2048) == pytest.approx((4 * flops, 4 * nbytes))
    for kind, a in stages.VAE_ANCHORS.items():      # each kind's anchor decodes in its published time
        assert stages.vae_kind(a["model"]) == kind
        assert stages.outside_seconds(P.devices[a["device"]], 0.5, a["model"], a["height"], a["width"], a["frames"],
                                      prompts=0) == pytest.approx(a["seconds"])
    assert stages.vae_kind("cogvideox-5b") == "video"
    assert stages.outside_seconds(P.devices["l20"], 0.5, "tiny_flux_mnist", 16, 16) == 0.0


def test_cfg_parallel_keeps_each_group_on_its_machine_and_counts_the_runtime_bytes():
    """CogVideoX (a CFG model) on 2 machines x 8 H100 over 25 GbE: with CFG parallel each half of the guidance batch
    runs inside one machine and only the velocities cross the NIC, so it beats a ring over both machines; the
    emulated model's bytes are what the runtime counts (tests/integration/test_cfg_parallel.py)."""
    video = dict(name="v", nodes=16, model={"name": "cogvideox-5b"}, resolution=720, height=480, frames=49, steps=50,
                 guidance=6.0, labels=1, methods=["ring", "cfg"], warmup={"mode": "sync", "steps": 1},
                 hardware={"device": "h100-sxm", "gpus_per_node": 8, "intra_node": "nvlink4",
                           "inter_node": "ethernet_25g"})
    rows, _ = predict(parse_scenario(video), CALIB)
    ring, cfg = rows
    assert cfg.latency_s < ring.latency_s / 5 and cfg.bytes_on_wire < ring.bytes_on_wire
    with pytest.raises(ScenarioError, match="guidance-distilled"):
        predict(flux(2, ["cfg"]), CALIB)
    tiny = parse_scenario(dict(name="t", nodes=4, labels=8, steps=3, methods=["cfg"], warmup={"mode": "local",
                                                                                               "steps": 1}))
    (row,), _ = predict(tiny, CALIB)
    half = 8
    kv, shard = 2 * half * (64 + 4) // 2 * 128 * 4, half * 32 * 4 * 4    # the velocity shard to the partner
    assert row.bytes_on_wire == 3 * 4 * (4 * kv + shard) + 4 * shard      # and the latents gathered once
    each_step = parse_scenario(dict(name="t", nodes=4, labels=8, steps=3, methods=["cfg"], output_gather="step",
                                    warmup={"mode": "local", "steps": 1}))
    (row,), _ = predict(each_step, CALIB)                                  # xDiT's way: whole outputs every step
    assert row.bytes_on_wire == 3 * 4 * (4 * kv + shard + 2 * shard)


@pytest.mark.parametrize("nodes, method", [(8, "ring"), (16, "compact-1bit"), (16, "compact-1bit-cfg")])
def test_unsplit_text_is_held_by_every_rank_and_never_sent(nodes, method):
    """4 label tokens on 8 or 16 ranks stay whole on every rank: the model's bytes are the image K/V the runtime
    sends (tests/integration/test_cfg_parallel.py measures the same runs)."""
    from compactbed.kernels.compressors import make_compressor
    from compactbed.kernels.spec import CompressorSpec

    sc = parse_scenario(dict(name="t", nodes=nodes, labels=8, steps=3, methods=[method],
                             warmup={"mode": "local", "steps": 1}))
    (row,), _ = predict(sc, CALIB)
    cfg = 2 if method.endswith("cfg") else 1
    p, half = nodes // cfg, 2 * 8 // cfg                   # group size, images of a group (guidance doubles)
    image = half * 64 // p                                 # exchanged: image tokens only
    kv = 2 * make_compressor(CompressorSpec(kind="1bit")).wire_nbytes(image, 128) if "compact" in method else \
        2 * image * 128 * 4
    per_step = (p - 1) * 4 * kv + (cfg - 1) * image * 4 * 4     # K/V, the velocity shard to the CFG partner
    steps = 2 if "compact" in method else 3                # the local warmup step sends nothing
    latents = 8 * 64 // p * 4 * 4                           # a rank's shard of the 8 images' latents, once
    assert row.bytes_on_wire == nodes * (steps * per_step + (p - 1) * latents)


def test_pipefusion_streams_patches_through_its_stages():
    """P stages, M patches: a synchronous warmup passes the whole image stage by stage; then a step costs M patch
    passes of a stage once the pipeline is full (it fills once); activations go stage to stage, latents back, and a
    slow hop gates every patch."""
    from compactbed.simulator import pipefusion

    sc = parse_scenario(dict(name="p", nodes=4, labels=2, steps=6, guidance=1.0, methods=["pipefusion"],
                             warmup={"mode": "sync", "steps": 1}))
    w = workload_of(sc, sc.methods[0])
    image, text = w.batch * w.image_tokens, w.batch * w.shape.text_tokens
    full, patch = 2.0, 0.1                                      # a stage's pass over the image, over one patch
    free = pipefusion.Costs(lambda s, tokens: full if tokens > image / 2 else patch, lambda a, b, n: 0.0)
    latency, compute, _, nbytes = pipefusion.simulate(w, free, patches=4)
    assert latency == pytest.approx(4 * full + 5 * 4 * patch + 3 * patch)
    assert compute == pytest.approx(full + 5 * 4 * patch)
    act, lat = w.shape.hidden * w.shape.act_bytes, w.shape.out_channels * w.shape.act_bytes
    assert nbytes == 6 * 3 * (image + text) * act + 5 * image * lat
    slow = pipefusion.Costs(free.stage_seconds, lambda a, b, n: 1.0 if (a, b) == (1, 2) else 0.0)
    assert pipefusion.simulate(w, slow, patches=4)[0] > 4 * full + 6 * 4 * 1.0 - 3


def test_the_video_models_shape_gives_the_bytes_the_runtime_sends():
    """tiny_cogvideox on 4 ranks (tests/integration/test_video.py measures the same): ring K/V of 2 blocks, 3 hops,
    and the output gather of 2x2 x 4-channel tokens."""
    sc = parse_scenario(dict(name="v", nodes=4, model={"name": "tiny_cogvideox"}, frames=4, labels=8, steps=3,
                             methods=["ring"], warmup={"mode": "sync", "steps": 1}))
    (row,), _ = predict(sc, CALIB)
    b, image = 16, 4 * 64
    per_step = 3 * (2 * 2 * b * (image + 4) // 4 * 64 * 4 + b * image // 4 * 16 * 4)
    assert row.bytes_on_wire == 3 * 4 * per_step


def test_cross_attention_text_stays_local_and_a_latent_output_skips_the_vae():
    """PixArt reaches its 120 text tokens by cross-attention: they are not in the self-attention sequence, so none
    of them is exchanged, and each block pays two more GEMMs and the cross-attention; a pipeline that returns its
    latents (xDiT's PixArt benchmark) pays its text encoder and no VAE decode."""
    from compactbed.simulator import stages

    sc = parse_scenario(dict(name="p", nodes=8, model={"name": "pixart-alpha"}, resolution=1024, steps=20,
                             guidance=4.5, labels=1, methods=["ulysses"],
                             hardware={"device": "a100-sxm", "gpus_per_node": 8, "intra_node": "nvlink3"}))
    w = workload_of(sc, sc.methods[0])
    assert w.tokens == 4096 and w.batch == 2 and w.exchanged_tokens == 2 * 4096 // 8
    dev = P.devices["a100-sxm"]
    plain = layer_seconds(dev, 0.5, 4096, 4096, 1152, 16)
    assert layer_seconds(dev, 0.5, 4096, 4096, 1152, 16, cross_tokens=120) > 1.08 * plain
    decoded, latent = (GpuSimulator(replace(w, decode=d), gpu_cluster_of(sc)) for d in (True, False))
    text = stages.outside_seconds(dev, latent.eff[0], "pixart-alpha", 1024, 1024, prompts=2, outputs=0)
    assert text > 0 and latent.outside() == pytest.approx(text) and decoded.outside() > text + 0.1
    sets = {s.name: s for s in published_sets(only=["xdit_pixart_a100_nvlink_4096"])}
    assert {r.label for r in sets["xdit_pixart_a100_nvlink_4096"].rows} == {"pipefusion", "distrifusion", "ulysses",
                                                                            "ring"}
