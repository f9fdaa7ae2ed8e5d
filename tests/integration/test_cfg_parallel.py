"""xDiT's CFG parallel over gloo: the guidance batch's halves on two groups of ranks, each group running its
sequence parallelism; uncompressed equals single-process diffusers, compressed sends exactly its wire format."""

import numpy as np
import pytest

from compactbed.kernels.compressors import make_compressor
from compactbed.kernels.spec import CompressorSpec
from compactbed.runtime.quality import psnr

from .conftest import LABELS, scenario

pytestmark = pytest.mark.slow

HALF = len(LABELS)                  # one CFG half: the conditional (or unconditional) batch


@pytest.mark.parametrize("nodes, methods", [(2, ["cfg"]), (4, ["cfg", "usp"]), (8, ["cfg"])])
def test_cfg_parallel_equals_single_process(launch_pass, reference, nodes, methods):
    """cfg alone (2 ranks), cfg x ring 2 and cfg x Ulysses 2 (4 ranks), cfg x ring 4 (8 ranks: 4 label tokens do
    not divide by 8, so 8 nodes run through CFG parallel)."""
    sc = scenario(nodes=nodes, steps=4 if nodes < 8 else 3, methods=methods, parallel={"cfg_degree": 2, "ulysses_degree": 2}
                  if "usp" in methods else {})
    outs, _ = launch_pass(sc, methods)
    for method, out in zip(methods, outs):
        assert out.run["cfg_degree"] == 2
        assert np.abs(out.images - reference(sc)).max() < 1e-4, method
    assert outs[0].run["degrees"] == [1, nodes // 2]


def test_cfg_parallel_bytes(launch):
    """Per step and rank on 4 nodes (cfg x ring 2): one hop of this half's K/V shard per layer, the group's output
    gather to its one peer, then the whole half's velocity to the other group."""
    out = launch(scenario(nodes=4, steps=2), "cfg")
    kv = 2 * HALF * (64 + 4) // 2 * 128 * 4
    sp_gather = HALF * 64 // 2 * 4 * 4
    cfg_gather = HALF * 64 * 4 * 4
    assert {r["bytes_sent"] for r in out.records} == {4 * kv + sp_gather + cfg_gather}


def test_compressed_cfg_parallel(launch, reference):
    """compact-1bit inside each CFG group: bases identical within the group (each group has its own streams),
    exactly the 1-bit payloads on the wire, quality of compact-1bit."""
    sc = scenario(nodes=4, steps=8)
    out = launch(sc, "compact-1bit-cfg")
    assert out.run["base_consistency"] == {"checked": 2 * 4 * 2 * 2, "mismatched": 0, "examples": []}
    payload = 2 * make_compressor(CompressorSpec(kind="1bit")).wire_nbytes(HALF * (64 + 4) // 2, 128)
    steady = 4 * payload + HALF * 64 // 2 * 4 * 4 + HALF * 64 * 4 * 4
    assert {r["bytes_sent"] for r in out.records if r["step"] > 0} == {steady}
    assert psnr(out.images, reference(sc)) > 28
