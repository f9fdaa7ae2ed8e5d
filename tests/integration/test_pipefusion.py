"""PipeFusion through xDiT's Flux pipeline over gloo: one stage of layers per rank, patches streaming through; exact
when every step is a warmup step (the whole image through the pipeline), stale K/V after warmup; bytes exact."""

import numpy as np
import pytest

from compactbed.runtime.quality import psnr

from .conftest import LABELS, scenario

pytestmark = pytest.mark.slow

B = len(LABELS)                                     # guidance 1.0: one pass per step


@pytest.mark.parametrize("nodes", [2, 4])
def test_pipefusion_with_every_step_warm_equals_single_process(launch, reference, nodes):
    sc = scenario(nodes=nodes, steps=3, guidance=1.0, methods=["pipefusion"], warmup=("sync", 3))
    out = launch(sc, "pipefusion")
    assert np.abs(out.images - reference(sc)).max() < 1e-4
    activations, latents = B * (64 + 4) * 128 * 4, B * 64 * 4 * 4
    for r in out.records:
        last_stage, last_step = r["rank"] == nodes - 1, r["step"] == sc.steps - 1
        expect = (0 if last_step else latents) if last_stage else activations
        assert r["bytes_sent"] - expect in (0, 32, 64), r    # + shape messages (rank, 3 sizes) when a shape is new


@pytest.mark.parametrize("ulysses", [1, 2])
def test_hybrid_pipefusion_with_sequence_parallel_stages_equals_single_process(launch, reference, ulysses):
    """pipefusion_degree 2 on 4 nodes: each stage's 2 ranks split its tokens by Ulysses or ring."""
    sc = scenario(nodes=4, steps=3, guidance=1.0, methods=["pipefusion"], warmup=("sync", 3),
                  parallel={"pipefusion_degree": 2, "ulysses_degree": ulysses})
    out = launch(sc, "pipefusion")
    assert np.abs(out.images - reference(sc)).max() < 1e-4
    assert out.run["degrees"] == [ulysses, 2 // ulysses]


def test_pipefusion_streams_stale_patches_after_warmup(launch_pass, reference):
    """4 stages, 4 patches, one warmup step: the stages send every patch's activations on (text with the first),
    the last stage the new latents back; quality of a stale method, beside DistriFusion's on the same run."""
    sc = scenario(nodes=4, steps=12, guidance=1.0, methods=["pipefusion", "distrifusion"], warmup=("sync", 1))
    (pf, df), _ = launch_pass(sc, ["pipefusion", "distrifusion"])
    ref = reference(sc)
    steady = {(r["rank"], r["bytes_sent"]) for r in pf.records if 1 < r["step"] < sc.steps - 1}   # shapes known
    assert steady == {(0, B * (64 + 4) * 128 * 4), (1, B * (64 + 4) * 128 * 4), (2, B * (64 + 4) * 128 * 4),
                      (3, B * 64 * 4 * 4)}
    assert psnr(pf.images, ref) > 20 and abs(psnr(pf.images, ref) - psnr(df.images, ref)) < 10
    assert pf.run["degrees"] == [1, 1] and len(pf.records) == 4 * sc.steps


def test_compressed_pipefusion_sends_1bit_residuals_of_the_activations(launch, reference):
    """compact-1bit-pipefusion: each activation a stage sends on is a residual stream (one per patch and kind,
    the first message in full precision); both ends keep identical bases; the latents back are not compressed."""
    from compactbed.kernels.compressors import make_compressor
    from compactbed.kernels.spec import CompressorSpec

    sc = scenario(nodes=4, steps=8, guidance=1.0, methods=["compact-1bit-pipefusion"], warmup=("sync", 1))
    out = launch(sc, "compact-1bit-pipefusion")
    assert out.run["base_consistency"]["checked"] > 0 and out.run["base_consistency"]["mismatched"] == 0
    one = make_compressor(CompressorSpec(kind="1bit"))
    stage = 4 * one.wire_nbytes(B * 64 // 4, 128) + one.wire_nbytes(B * 4, 128)   # 4 patches, the text once
    seeded = {(r["rank"], r["bytes_sent"]) for r in out.records if 4 < r["step"] < sc.steps - 1}
    assert seeded == {(0, stage), (1, stage), (2, stage), (3, B * 64 * 4 * 4)}
    assert psnr(out.images, reference(sc)) > 20
