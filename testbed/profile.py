"""``scenario profile``: measure the machine it runs on as a device profile, in the shipped profiles' form.

CUDA where present, else the CPU. Measured in one run, with random weights (nothing is downloaded):
  peak        a large square GEMM (bf16 on CUDA, fp32 on CPU), TFLOPS
  memory      a device-to-device copy, GB/s (bytes read + written)
  blocks      diffusers' FluxSingleTransformerBlock over a grid of token counts and widths: the efficiency the
              simulator's block formula needs to reproduce them (median over the grid)
  codec       the residual codec's 1-bit and 2-bit encode and decode (Triton on CUDA, Numba on CPU) next to the copy
  collective  an all-gather between ranks on this machine (NCCL across GPUs where there are two, else gloo over
              loopback), fitted to nccl-tests' form: (P-1) x (latency + n / busbw)
Writes ``<name>.devices.yaml`` and ``<name>.links.yaml``; in ``simulator/profiles`` they join the shipped ones.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..kernels.bench import timer
from ..simulator.gpu import layer_seconds
from ..simulator.hardware import DeviceSpec, LayerPoint, LinkClass, write_devices, write_links
from .launch import free_port

GRID = {"cuda": {"tokens": [1024, 4096, 8192], "hidden": [1536, 3072]},
        "cpu": {"tokens": [128, 512, 1024], "hidden": [256, 512]}}
HEAD_DIM = 64
SIZES = [2 ** k for k in range(10, 25, 2)]          # all-gather bytes per rank: 1 KiB .. 16 MiB


def measure_peak(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timer(device)(lambda: a @ b, 10) / 1e12


def measure_memory(device: torch.device) -> float:
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    return 2 * n / timer(device)(lambda: dst.copy_(src), 10) / 1e9


def measure_blocks(device: torch.device, dtype: torch.dtype, say) -> list[LayerPoint]:
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    grid, points = GRID[device.type], []
    for h in grid["hidden"]:
        block = FluxSingleTransformerBlock(h, h // HEAD_DIM, HEAD_DIM).to(device, dtype).eval()
        for t in grid["tokens"]:
            x = torch.randn(1, t, h, device=device, dtype=dtype)
            text = torch.randn(1, 0, h, device=device, dtype=dtype)
            temb = torch.randn(1, h, device=device, dtype=dtype)
            with torch.no_grad():
                s = timer(device)(lambda: block(x, text, temb), 5)
            points.append(LayerPoint(tokens=t, hidden=h, heads=h // HEAD_DIM, seconds=s))
            say(f"block: {t} tokens x {h} wide: {s * 1e3:.2f} ms")
    return points


def fit_block_efficiency(dev: DeviceSpec, points: list[LayerPoint]) -> float:
    """The efficiency at which the simulator's block formula reproduces the measured blocks (median ratio)."""
    return float(np.median([layer_seconds(dev, 1.0, p.tokens, p.tokens, p.hidden, p.heads, dev.act_bytes) / p.seconds
                            for p in points]))


def measure_codec(device: torch.device, dtype: torch.dtype, say) -> dict[str, float]:
    from ..kernels.bench import bench_shape
    from ..kernels.spec import CompressorSpec

    n, c = (4096, 3072) if device.type == "cuda" else (1024, 512)
    rows = bench_shape(n, c, dtype, device, "auto", reps=10,
                       specs=[CompressorSpec(kind="1bit"), CompressorSpec(kind="2bit")])
    out = {}
    for r in rows:
        say(f"codec {r['codec']} ({'fused' if r['fused'] else 'reference'}): encode {r['encode_gbps']} GB/s, "
            f"decode {r['decode_gbps']} GB/s, copy {r['copy_gbps']} GB/s")
        out[f"{r['codec']}/encode"] = 1 / (r["encode_gbps"] * 1e9)
        out[f"{r['codec']}/decode"] = 1 / (r["decode_gbps"] * 1e9)
    return out


def _gather_worker(rank: int, world: int, port: int, backend: str, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    try:
        rows = []
        for n in SIZES:
            x = torch.zeros(n, dtype=torch.uint8, device=device)
            out = [torch.empty_like(x) for _ in range(world)]
            dist.barrier()
            s = timer(device)(lambda: dist.all_gather(out, x), 7)
            rows.append((n, s))
        if rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def measure_collective(world: int, backend: str) -> list[tuple[int, float]]:
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, world, port, backend, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        rows = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return rows


def fit_collective(rows: list[tuple[int, float]], world: int) -> tuple[float, float]:
    """(latency s, busbw B/s) of t / (P-1) = latency + n / busbw, by least squares on the relative error."""
    n = np.array([r[0] for r in rows], float)
    y = np.array([r[1] for r in rows], float) / (world - 1)
    a = np.stack([np.ones_like(n), n], 1) / y[:, None]
    (lat, inv_bw), *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
    return max(float(lat), 0.0), 1 / max(float(inv_bw), 1e-15)


def profile(name: str, out: Path, say=print, collective: bool = True) -> tuple[DeviceSpec, LinkClass | None]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    kind = torch.cuda.get_device_name(0) if cuda else f"CPU, {os.cpu_count()} cores"
    say(f"profiling {kind} as {name!r}")
    peak, memory = measure_peak(device, dtype), measure_memory(device)
    say(f"peak {peak:.2f} TFLOPS ({str(dtype).removeprefix('torch.')} GEMM), memory {memory:.1f} GB/s (copy)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 0
    dev = DeviceSpec(name=name, peak_tflops=round(peak, 3), hbm_gbs=round(memory, 1),
                     memory_gib=round((torch.cuda.get_device_properties(0).total_memory if cuda else 0) / 2 ** 30, 1),
                     sms=sms, act_bytes=2 if cuda else 4,
                     source=f"measured by `scenario profile` on {kind} ({time.strftime('%Y-%m-%d')}): peak = GEMM "
                            f"rate, hbm_gbs = copy rate")
    points = measure_blocks(device, dtype, say)
    dev = replace(dev, measured=tuple(points), efficiency=round(fit_block_efficiency(dev, points), 4))
    codec = measure_codec(device, dtype, say)
    dev = replace(dev, codec=tuple(sorted(codec.items())), codec_source="measured by `scenario profile`")
    say(f"efficiency {dev.efficiency:.3f} of the measured peak reproduces the blocks (median)")
    out.mkdir(parents=True, exist_ok=True)
    write_devices({name: dev}, out / f"{name}.devices.yaml")
    link = None
    gpus = torch.cuda.device_count() if cuda else 0
    if collective:
        backend, world = ("nccl", min(gpus, 8)) if gpus >= 2 else ("gloo", 2)
        rows = measure_collective(world, backend)
        lat, bw = fit_collective(rows, world)
        say(f"all-gather over {world} ranks ({backend}): latency {lat * 1e6:.1f} us per step, busbw {bw / 1e9:.2f} GB/s"
            + ("" if gpus >= 2 else " (one GPU or none: processes on this machine, not a GPU link)"))
        link = LinkClass(name=f"{name}-local", scope="intra", busbw_gbs=round(bw / 1e9, 3),
                         latency_us=round(lat * 1e6, 2), transport=backend,
                         source=f"measured by `scenario profile` on {kind}: all-gather over {world} ranks ({backend})")
        write_links({link.name: link}, out / f"{name}.links.yaml")
    return dev, link
