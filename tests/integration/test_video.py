"""The video DiT (diffusers' CogVideoXTransformer3DModel, tiny config, random weights) through the same runtime:
xDiT's sequence parallelism equals single-process diffusers; compressed methods keep identical bases and send exactly
their wire format."""

import numpy as np
import pytest

from compactbed.kernels.compressors import make_compressor
from compactbed.kernels.spec import CompressorSpec

from .conftest import LABELS, scenario

pytestmark = pytest.mark.slow

B = 2 * len(LABELS)                 # guidance doubles the batch
FRAMES, IMAGE = 4, 4 * 64           # 4 frames of 8 x 8 patches


def video(nodes, methods, **kw):
    return scenario(nodes=nodes, steps=3, methods=methods, model={"name": "tiny_cogvideox"}, frames=FRAMES,
                    warmup=("sync", 1), **kw)


@pytest.mark.parametrize("nodes, methods", [(4, ["ring", "ulysses", "usp", "cfg"]), (8, ["ring"])])
def test_video_sequence_parallel_equals_single_process(launch_pass, reference, nodes, methods):
    """Ring, Ulysses, USP 2 x 2 and CFG x ring on 4 ranks; on 8 the 4 text tokens stay whole on every rank."""
    sc = video(nodes, methods, parallel={"ulysses_degree": 2})
    outs, _ = launch_pass(sc, methods)
    for method, out in zip(methods, outs):
        assert out.images.shape == (len(LABELS), FRAMES * 4, 16, 16)
        assert np.abs(out.images - reference(sc)).max() < 1e-4, method
    text = 4 // nodes if 4 % nodes == 0 else 0          # text K/V a rank sends
    kv = 2 * B * (IMAGE // nodes + text) * 64 * 4
    gather = B * IMAGE // nodes * 16 * 4
    assert {r["bytes_sent"] for r in outs[0].records} == {(nodes - 1) * (2 * kv + gather)}


def test_video_compact_1bit_sends_its_wire_format(launch):
    sc = video(4, ["compact-1bit"])
    out = launch(sc, "compact-1bit")
    assert out.run["base_consistency"] == {"checked": 2 * 4 * 2, "mismatched": 0, "examples": []}
    payload = 2 * make_compressor(CompressorSpec(kind="1bit")).wire_nbytes(B * (IMAGE + 4) // 4, 64)
    gather = B * IMAGE // 4 * 16 * 4
    assert {r["bytes_sent"] for r in out.records if r["step"] > 0} == {3 * (2 * payload + gather)}
