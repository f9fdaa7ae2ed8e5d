"""Codec throughput benchmark: encode (residual + compress + base update) and decode, in GB/s of input
activation bytes, next to a plain tensor copy of the same bytes measured in the same run.

usage: python -m compactbed.kernels.bench [--device cpu|cuda] [--threads 1] [--shape 4096x1024 ...]
Goals (issue 3): 1-bit/2-bit within 3x of copy time on CPU; >= 70% of copy bandwidth for fused GPU kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .backend import Backend, make_codec, select_fused
from .codec import StreamKey
from .spec import CodecSpec, CompressorSpec

SPECS = [CompressorSpec(kind="1bit"), CompressorSpec(kind="2bit"), CompressorSpec(kind="identity"),
         CompressorSpec(kind="lowrank", rank=8), CompressorSpec(kind="sparse")]


def timer(device: torch.device):
    """``run(fn, reps)``: the median seconds of ``fn`` over ``reps`` calls after one warm-up (CUDA events on GPUs)."""
    if device.type == "cuda":
        def run(fn, reps):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, reps):
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return run


def bench_shape(n: int, c: int, dtype: torch.dtype, device: torch.device, backend: Backend,
                reps: int, specs=SPECS) -> list[dict]:
    timed = timer(device)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, c, generator=g).to(device, dtype)
    x1 = (x0.float() + 0.05 * torch.randn(n, c, generator=g).to(device)).to(dtype)
    nbytes = x0.numel() * x0.element_size()
    dst = torch.empty_like(x0)
    copy_s = timed(lambda: dst.copy_(x1), reps)
    rows = []
    key = StreamKey(0, 0, "k")
    for spec in specs:
        codec_spec = CodecSpec(compressor=spec)
        snd, rcv = make_codec(codec_spec, backend, device), make_codec(codec_spec, backend, device)
        snd.seed(key, x0)
        rcv.seed(key, x0)
        buf = snd.encode(key, x1)
        enc_s = timed(lambda: snd.encode(key, x1), reps)
        dec_s = timed(lambda: rcv.decode(key, buf, (n, c), dtype), reps)
        rows.append(dict(shape=f"{n}x{c}", dtype=str(dtype).removeprefix("torch."), device=device.type,
                         codec=spec.label(), fused=snd.fused is not None, wire_bytes=buf.numel(),
                         ratio_vs_input=round(nbytes / buf.numel(), 2), copy_gbps=round(nbytes / copy_s / 1e9, 2),
                         encode_gbps=round(nbytes / enc_s / 1e9, 2), decode_gbps=round(nbytes / dec_s / 1e9, 2),
                         encode_over_copy=round(enc_s / copy_s, 2), decode_over_copy=round(dec_s / copy_s, 2)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "numba", "triton"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a rank is pinned to 1)")
    ap.add_argument("--shape", nargs="+", default=None, help="NxC shapes (default: 1088x3072 and 4096x1024)")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (a.shape or ["1088x3072", "4096x1024"])]
    _, why = select_fused(a.backend, device)
    print(f"device={device} threads={torch.get_num_threads()} dtype={dtype} backend: {why}")
    head = f"{'shape':>10} {'codec':>15} {'ratio':>6} {'copy GB/s':>9} {'enc GB/s':>8} {'dec GB/s':>8} " \
           f"{'enc/copy':>8} {'dec/copy':>8}"
    print(head)
    rows = []
    for n, c in shapes:
        for r in bench_shape(n, c, dtype, device, a.backend, a.reps):
            rows.append(r)
            print(f"{r['shape']:>10} {r['codec']:>15} {r['ratio_vs_input']:>6} {r['copy_gbps']:>9} "
                  f"{r['encode_gbps']:>8} {r['decode_gbps']:>8} {r['encode_over_copy']:>8} "
                  f"{r['decode_over_copy']:>8}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
