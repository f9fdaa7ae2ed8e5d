"""xDiT's CFG parallel over gloo (the guidance batch's halves on two groups of ranks, each group running its
sequence parallelism) and wide clusters (8 and 16 ranks, label tokens kept whole): uncompressed equals single-process
diffusers, compressed sends exactly its wire format."""

import numpy as np
import pytest

from compactbed.kernels.compressors import make_compressor
from compactbed.kernels.spec import CompressorSpec
from compactbed.runtime.quality import psnr

from .conftest import LABELS, scenario

pytestmark = pytest.mark.slow

HALF = len(LABELS)                  # one CFG half: the conditional (or unconditional) batch


@pytest.mark.parametrize("nodes, methods", [(2, ["cfg"]), (4, ["cfg", "usp"])])
def test_cfg_parallel_equals_single_process(launch_pass, reference, nodes, methods):
    """cfg alone (2 ranks), cfg x ring 2 and cfg x Ulysses 2 (4 ranks; cfg x ring 4 on 8 ranks below)."""
    sc = scenario(nodes=nodes, steps=4, methods=methods, parallel={"cfg_degree": 2, "ulysses_degree": 2}
                  if "usp" in methods else {})
    outs, _ = launch_pass(sc, methods)
    for method, out in zip(methods, outs):
        assert out.run["cfg_degree"] == 2
        assert np.abs(out.images - reference(sc)).max() < 1e-4, method
    assert outs[0].run["degrees"] == [1, nodes // 2]


def test_cfg_parallel_bytes(launch):
    """Per step and rank on 4 nodes (cfg x ring 2): one hop of this half's K/V shard per layer, its shard of the
    half's velocity to the other group, and after the last step the group's output gather to its one peer."""
    out = launch(scenario(nodes=4, steps=2), "cfg")
    kv = 2 * HALF * (64 + 4) // 2 * 128 * 4
    shard = HALF * 64 // 2 * 4 * 4
    assert {(r["step"], r["bytes_sent"]) for r in out.records} == {(0, 4 * kv + shard), (1, 4 * kv + 2 * shard)}


def test_compressed_cfg_parallel(launch, reference):
    """compact-1bit inside each CFG group: bases identical within the group (each group has its own streams),
    exactly the 1-bit payloads on the wire, quality of compact-1bit."""
    sc = scenario(nodes=4, steps=8)
    out = launch(sc, "compact-1bit-cfg")
    assert out.run["base_consistency"] == {"checked": 2 * 4 * 2 * 2, "mismatched": 0, "examples": []}
    payload = 2 * make_compressor(CompressorSpec(kind="1bit")).wire_nbytes(HALF * (64 + 4) // 2, 128)
    shard = HALF * 64 // 2 * 4 * 4                 # the velocity shard to the partner; the last step's gather
    assert {(r["step"] == sc.steps - 1, r["bytes_sent"]) for r in out.records if r["step"] > 0} == \
        {(False, 4 * payload + shard), (True, 4 * payload + 2 * shard)}
    assert psnr(out.images, reference(sc)) > 28


def test_eight_ranks_keep_the_label_tokens_whole(launch_pass, reference):
    """4 label tokens do not divide by 8: every rank holds them all, they never cross the network, and ring, patch,
    USP (Ulysses 2 x ring 4) and cfg (ring 4 in each half) still equal single-process diffusers; ring sends image
    K/V only."""
    methods = ["ring", "patch", "usp", "cfg"]
    sc = scenario(nodes=8, steps=3, methods=methods, parallel={"ulysses_degree": 2})
    outs, _ = launch_pass(sc, methods)
    for method, out in zip(methods, outs):
        assert np.abs(out.images - reference(sc)).max() < 1e-4, method
    b = 2 * len(LABELS)
    kv = 2 * b * 64 // 8 * 128 * 4                 # image tokens only
    gather = b * 64 // 8 * 4 * 4
    assert {(r["step"], r["bytes_sent"]) for r in outs[0].records} == \
        {(0, 7 * 4 * kv), (1, 7 * 4 * kv), (2, 7 * (4 * kv + gather // 2))}     # the latents: no guidance copy


def test_sixteen_ranks_run_compressed(launch_pass, reference):
    """16 ranks on the 2-core host: ring exact, compact-1bit with identical bases and its exact wire format."""
    sc = scenario(nodes=16, steps=2, methods=["ring", "compact-1bit"])
    ring, compact = launch_pass(sc, ["ring", "compact-1bit"], timeout_s=400)[0]
    assert np.abs(ring.images - reference(sc)).max() < 1e-4
    assert compact.run["base_consistency"] == {"checked": 4 * 16 * 2, "mismatched": 0, "examples": []}
    b = 2 * len(LABELS)
    payload = 2 * make_compressor(CompressorSpec(kind="1bit")).wire_nbytes(b * 64 // 16, 128)
    assert {r["bytes_sent"] for r in compact.records if r["step"] > 0} == {15 * (4 * payload + b // 2 * 4 * 4 * 4)}
