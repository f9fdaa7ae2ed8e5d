"""One rank of a launch of method runs: real xDiT sequence parallelism with compressed communication.

Started by torchrun (one process per node) as ``python -m compactbed.runtime.engine JOB.json [JOB.json ...]``; each
job file holds the validated scenario, one method, the seed and its output folder. The ranks run the jobs in turn
in one process group: every job builds its model, codec and hooks afresh, and xfuser's parallel groups too unless
the job before ran with the same degrees (the groups hold no state of a run), so nothing else carries over but the
process and its imports. A job with ``links_ready`` starts a new link pass: the ranks wait while the launcher
reshapes the links (:func:`wait_for_links`). Each rank writes ``rank{r}.jsonl`` (one :class:`.records.StepRecord`
per step) into the job's folder; rank 0 also writes ``images.npy`` and ``run.json`` (a :class:`.records.RunRecord`).
A job that fails writes ``rank{r}.error`` there and ends the launch; the jobs before it keep their results. Rank 0
prints ``RUN i/N`` before each job, ``STEP k/n`` after each step and ``LINKS i/N`` when job i needs new links.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from ..kernels.backend import Backend, make_codec, select_fused
from ..kernels.codec import ResidualCodec, StreamKey
from ..scenarios.schema import MethodSpec, Scenario
from .comm import CommHooks, kv_2d
from .models import load_for
from .records import RunRecord, StepRecord, write_run, write_steps
from .sampling import guided_call


class Job(BaseModel):
    """What every rank of one launch runs."""

    model_config = ConfigDict(extra="forbid")

    scenario: Scenario
    method: MethodSpec
    seed: int
    out_dir: str
    backend: Backend = "auto"
    links_ready: str | None = None      # a file the launcher creates once it has reshaped the links for this job


class RankRun:
    """Builds the parallel model for ``job`` on this rank and samples with it, recording every step."""

    def __init__(self, job: Job):
        self.job, self.sc, self.method = job, job.scenario, job.method
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.dtype = getattr(torch, self.sc.model.dtype)
        compressed = job.method.compressed
        self.codec: ResidualCodec | None = make_codec(job.method.codec, job.backend, self.device) if compressed else None
        self.backend_reason = select_fused(job.backend, self.device)[1] if compressed else "uncompressed"
        if self.codec is not None:
            self.codec.warm_up(self.dtype, self.device)     # JIT/cache loading is start-up, not step time
        self.cfg = self.sc.cfg_degree(self.method)
        self.warmup_steps = self.sc.warmup.steps if self.method.warms_up else 0
        self.records: list[StepRecord] = []

    # --- setup --------------------------------------------------------------------------------------------
    def build(self) -> None:
        if self.method.pipelined:
            return self._build_pipefusion()
        from xfuser.config import xFuserArgs
        from xfuser.core.distributed import (get_classifier_free_guidance_rank, get_runtime_state, get_sp_group,
                                             init_distributed_environment, initialize_runtime_state)
        from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper

        from . import video

        ulysses, ring = self.sc.degrees(self.method)
        # the process group exists already (with the scenario's timeout); this builds xfuser's world group
        init_distributed_environment(rank=self.rank, world_size=self.world)
        args = xFuserArgs(model=str(self.sc.model.path or self.sc.model.name), ulysses_degree=ulysses,
                          ring_degree=ring, use_cfg_parallel=self.cfg == 2,
                          attention_backend="SDPA_FLASH" if self.device.type == "cpu" else None)
        engine_config, _ = args.create_config()
        is_video = self.sc.model.path is None and self.sc.model.name == video.VIDEO_MODEL
        self.dit = load_for(self.sc.model, transformer_cls=None if is_video else xFuserFlux1Transformer2DWrapper,
                            frames=self.sc.frames).to(self.device)
        self.model = self.dit.transformer
        height, vae_scale = self.dit.xfuser_geometry(self.sc.resolution)
        initialize_runtime_state(types.SimpleNamespace(transformer=self.model, vae_scale_factor=vae_scale),
                                 engine_config)
        # compressed streams and K/V exchanges live in this rank's sequence-parallel group (its CFG half)
        sp = get_sp_group()
        self.sp_group, self.sp_rank, self.sp_world = sp.device_group, sp.rank_in_group, sp.world_size
        self.cfg_rank = get_classifier_free_guidance_rank()
        self.hooks = CommHooks(self.codec, self.sp_rank, self.sp_world, direct=self.method.exchange == "direct")
        self.cfg_scale = self.dit.cfg_scale(self.sc.guidance)
        get_runtime_state().set_input_parameters(
            height=height, width=height, batch_size=self.sc.images * (2 if self.cfg_scale != 1.0 else 1),
            num_inference_steps=self.sc.steps, max_condition_sequence_length=self.dit.text_tokens,
            split_text_embed_in_sp=True)
        self._layer_t0: dict[int, float] = {}
        if is_video:
            self._build_video()
        else:
            self._build_flux()
        for i, blk in enumerate(self.blocks):
            blk.register_forward_pre_hook(lambda m, a, i=i: self._enter_layer(i))
            blk.register_forward_hook(lambda m, a, o, i=i: self._leave_layer(i))

    def _build_video(self) -> None:
        """The video DiT: its blocks with xDiT's CogVideoX attention processor, run by :func:`.video.sp_forward`."""
        from xfuser.model_executor.layers.attention_processor import xFuserCogVideoXAttnProcessor2_0

        from .video import sp_forward

        self.blocks = list(self.model.transformer_blocks)
        for blk in self.blocks:
            blk.attn1.set_processor(xFuserCogVideoXAttnProcessor2_0())
        self.call = lambda x, t, **kw: sp_forward(self.model, x, timestep=t, **kw)
        self.exchange_processors, self.local_processors = None, None

    def _build_flux(self) -> None:
        from .attention import ExchangeAttnProcessor, UnsplitTextAttnProcessor

        self.blocks = [*self.model.transformer_blocks, *self.model.single_transformer_blocks]
        self.call = lambda x, t, **kw: self.model(x, timestep=t, **kw)
        self.attn_modules = [blk.attn for blk in self.blocks]
        # text tokens that do not divide by the group stay whole on every rank (xfuser's wrapper decides the same)
        self.unsplit_text = self.dit.text_tokens if self.dit.text_tokens % self.sp_world else 0
        if self.unsplit_text:
            self._set_processors([UnsplitTextAttnProcessor(self.unsplit_text) for _ in self.attn_modules])
        self.xdit_processors = [a.processor for a in self.attn_modules]
        self.exchange_processors = None
        if self.method.own_attention_exchange:
            self.exchange_processors = [ExchangeAttnProcessor(self.method.comm, self.hooks, self.sp_group,
                                                              self.unsplit_text) for _ in self.attn_modules]
            self._set_processors(self.exchange_processors)
        self.local_processors = [ExchangeAttnProcessor("local") for _ in self.attn_modules]

    def _build_pipefusion(self) -> None:
        """PipeFusion (:mod:`.pipefusion`): xDiT's own pipeline, one stage per rank; no K/V exchange, the codec (if
        any) on the activations stage to stage."""
        from xfuser.core.distributed import init_distributed_environment

        from . import pipefusion

        init_distributed_environment(rank=self.rank, world_size=self.world)
        self.dit = load_for(self.sc.model).to(self.device)
        pipefusion.check(self.dit, self.sc.guidance)
        stages, (ulysses, ring) = self.sc.stages(self.method), self.sc.degrees(self.method)
        self.patches = self.method.patches or stages
        self.pipe = pipefusion.pipeline(self.dit, stages, self.patches, self.warmup_steps, self.dtype, ulysses, ring)
        self.hooks = CommHooks(None, self.rank, self.world)     # a stage's own sequence parallelism: uncompressed
        self.hooks.pipeline_patches, self.hooks.pipeline_codec = self.patches, self.codec
        self.cfg_rank, self.exchange_processors = 0, None

    def _sample_pipefusion(self) -> np.ndarray | None:
        from . import pipefusion

        res, last = self.sc.resolution, self.world - 1
        x = self.dit.initial_tokens(self.sc.images, res, self.job.seed).to(self.device)

        def on_step(k: int, wall_s: float) -> None:
            c = self.hooks.counters
            self.records.append(StepRecord(
                rank=self.rank, step=k, warmup="sync" if k < self.warmup_steps else None, wall_s=wall_s,
                comm_wait_s=c.comm_wait_s, codec_s=0.0, compute_s=max(wall_s - c.comm_wait_s, 0.0),
                bytes_sent=c.bytes_sent, bytes_uncompressed=c.bytes_uncompressed, exchanges=c.exchanges,
                layer_compute_s={}))
            if self.rank == 0:
                print(f"STEP {k + 1}/{self.sc.steps}", flush=True)

        dist.barrier()
        t_start = time.perf_counter()
        out = pipefusion.sample(self.pipe, self.dit, self.sc.conditions, res, self.sc.steps, self.warmup_steps,
                                self.patches, x, self.hooks, on_step)
        dist.barrier()
        self.latency_s = time.perf_counter() - t_start
        if last > 0:        # the result is on the last stage (its last rank); rank 0 decodes it after the timing
            if self.rank == last:
                dist.send(out.contiguous(), 0)
            elif self.rank == 0:
                out = torch.empty_like(x)
                dist.recv(out, last)
        return self.dit.decode(out.float(), res).numpy() if self.rank == 0 else None

    def _set_processors(self, procs) -> None:
        for a, p in zip(self.attn_modules, procs):
            a.processor = p

    def _enter_layer(self, i: int) -> None:
        self.hooks.enter_layer(i)
        self._layer_t0[i] = (time.perf_counter(), self.hooks.counters.comm_wait_s + self.hooks.counters.codec_s)

    def _leave_layer(self, i: int) -> None:
        t0, c0 = self._layer_t0.pop(i)
        c = self.hooks.counters
        busy = time.perf_counter() - t0 - (c.comm_wait_s + c.codec_s - c0)
        c.layer_compute_s[i] = c.layer_compute_s.get(i, 0.0) + busy

    # --- sampling -------------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, kw: dict, local: bool) -> torch.Tensor:
        if not local:
            kw = self.group_kw
            with self.hooks.installed():
                return guided_call(lambda xin, t: self.call(xin, t, **kw)[0], x, sigma, self.cfg_scale, self.dtype)
        # local warmup: the whole sequence on this rank, plain diffusers forward, no communication
        from diffusers import FluxTransformer2DModel

        self._set_processors(self.local_processors)
        try:
            v = guided_call(lambda xin, t: FluxTransformer2DModel.forward(self.model, xin, timestep=t, **kw)[0],
                            x, sigma, self.cfg_scale, self.dtype)
        finally:
            self._set_processors(self.exchange_processors or self.xdit_processors)
        self._seed_bases(kw)
        return v

    def _seed_bases(self, kw: dict) -> None:
        """Local warmup: split each layer's full-sequence K/V into every rank's shard, as the parallel
        model lays it out (this CFG group's half of the batch; [text chunk r; image chunk r], or image chunk r
        where the text is unsplit), and seed that rank's bases on every rank of the group."""
        if self.codec is None and not self.method.stale_kv:
            return
        txt = kw["encoder_hidden_states"].shape[1]
        for layer, proc in enumerate(self.local_processors):
            k, v = (t.chunk(self.cfg, 0)[self.cfg_rank] for t in proc.recorded)
            shards = []
            for r in range(self.sp_world):
                def shard(t):
                    tt, ii = t[:, :, :txt], t[:, :, txt:]
                    if self.unsplit_text:
                        return ii.chunk(self.sp_world, 2)[r].contiguous()
                    return torch.cat([tt.chunk(self.sp_world, 2)[r], ii.chunk(self.sp_world, 2)[r]], 2)
                shards.append((shard(k), shard(v)))
            if self.codec is not None:
                for r, (ks, vs) in enumerate(shards):
                    self.codec.seed(StreamKey(layer, r, "k"), kv_2d(ks).contiguous())
                    self.codec.seed(StreamKey(layer, r, "v"), kv_2d(vs).contiguous())
            if self.exchange_processors is not None:
                self.exchange_processors[layer].stale = shards
            proc.recorded = None

    def sample(self) -> np.ndarray | None:
        """Sample every image; rank 0 returns them decoded ([B, C, H, W] in [-1, 1]), other ranks None."""
        if self.method.pipelined:
            return self._sample_pipefusion()
        res = self.sc.resolution
        kw = self.dit.transformer_inputs(self.sc.conditions, res, self.sc.guidance, self.dtype, self.device)
        self.group_kw = kw              # the parallel forward's inputs: xfuser's wrapper halves a CFG batch itself,
        if self.cfg > 1 and "pooled_projections" in kw:         # but for the pooled projections
            self.group_kw = kw | {"pooled_projections": kw["pooled_projections"].chunk(self.cfg)[self.cfg_rank]}
        x = self.dit.initial_tokens(self.sc.images, res, self.job.seed).to(self.device)
        sig = self.dit.sigmas(self.sc.steps, res)
        own = self._keep_sharded(x)
        dist.barrier()
        t_start = time.perf_counter()
        for k in range(self.sc.steps):
            warm = k < self.warmup_steps
            local = warm and self.sc.warmup.mode == "local"
            self.hooks.start_step(k, full_precision=warm and not local)
            if self.exchange_processors is not None:
                for p in self.exchange_processors:
                    p.fresh = warm and not local
            t0 = time.perf_counter()
            v = self._forward(x, sig[k], kw, local)
            if own is None or local:    # the whole velocity (a local warmup step computes every token)
                x = x + (sig[k + 1] - sig[k]) * v
            else:                       # sharded latents: the velocity of this rank's tokens moves them alone
                x[:, own] = x[:, own] + (sig[k + 1] - sig[k]) * v
                if k == self.sc.steps - 1:
                    x = self._gather_latents(x, own)
            c = self.hooks.counters
            self.records.append(StepRecord(
                rank=self.rank, step=k, warmup=("local" if local else "sync") if warm else None,
                wall_s=time.perf_counter() - t0, comm_wait_s=c.comm_wait_s, codec_s=c.codec_s,
                compute_s=sum(c.layer_compute_s.values()), bytes_sent=c.bytes_sent,
                bytes_uncompressed=c.bytes_uncompressed, exchanges=c.exchanges, comm_hidden_s=c.comm_hidden_s,
                layer_compute_s={str(i): round(s, 6) for i, s in sorted(c.layer_compute_s.items())}))
            if self.rank == 0:
                print(f"STEP {k + 1}/{self.sc.steps}", flush=True)
        dist.barrier()
        self.latency_s = time.perf_counter() - t_start
        return self.dit.decode(x, res).numpy() if self.rank == 0 else None

    def _keep_sharded(self, x: torch.Tensor) -> slice | None:
        """Unless the output is gathered every step: make xfuser's wrapper return this rank's shard of the output
        (its sequence-parallel gather skipped; the CFG partner exchange stays) and return the shard's token slice.
        The Euler update is per token and the wrapper reads only this shard of the latents, so the other tokens
        may go stale until the one gather after the last step."""
        if self.sc.gathers_each_step(self.method) or self.sp_world == 1:
            return None
        from xfuser.core.distributed import get_sp_group

        n, rem = divmod(x.shape[1], self.sp_world)
        if rem:
            raise ValueError(f"output_gather end: {x.shape[1]} image tokens do not divide over {self.sp_world} "
                             f"ranks (set output_gather: step)")
        self.hooks.sharded_output = get_sp_group()
        return slice(self.sp_rank * n, (self.sp_rank + 1) * n)

    def _gather_latents(self, x: torch.Tensor, own: slice) -> torch.Tensor:
        """The one output gather of sharded latents, counted like the wrapper's."""
        from xfuser.core.distributed import get_sp_group

        self.hooks.sharded_output = None
        with self.hooks.installed():
            return get_sp_group().all_gather(x[:, own].contiguous(), dim=-2)

    def check_bases(self) -> dict:
        """Cross-rank consistency: every stream's base digest must agree on all ranks (EF mode), once the
        refreshes DistriFusion sent ahead are in (after the timed generation); each CFG group has its own."""
        for proc in self.exchange_processors or []:
            proc.drain()
        if self.codec is None or self.method.codec.residual != "ef":
            return {"checked": 0, "mismatched": 0}
        mine = {f"cfg{self.cfg_rank}/{k.layer}/{k.src}/{k.name}": self.codec.digest(k)
                for k in sorted(self.codec.bases)}
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        keys = set().union(*everyone)
        bad = [k for k in keys if len({d.get(k) for d in everyone if k in d}) > 1]
        return {"checked": len(keys), "mismatched": len(bad), "examples": sorted(bad)[:5]}


def run(job: Job, keep_groups: bool = False, launch_job: int = 0) -> None:
    """One job on this rank, the ``launch_job``-th of its launch (0: the processes' first). ``keep_groups``: leave
    xfuser's parallel groups for the next job, which runs with the same degrees (creating a group takes several
    round trips of the links); otherwise they are torn down."""
    from xfuser.core.distributed.parallel_state import destroy_model_parallel

    out = Path(job.out_dir)
    rank = dist.get_rank()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rr = RankRun(job)
    kept = False
    try:
        rr.build()
        images = rr.sample()
        consistency = rr.check_bases()
        kept = keep_groups
    finally:
        if not kept:
            destroy_model_parallel()        # the next job builds its own groups (its degrees differ)
    write_steps(out / f"rank{rank}.jsonl", rr.records)
    dist.barrier()                          # every rank's records are on disk before run.json says "done"
    if rank == 0:
        np.save(out / "images.npy", images)
        write_run(out / "run.json", RunRecord(
            method=job.method.model_dump(), seed=job.seed, world=rr.world, degrees=job.scenario.degrees(job.method),
            cfg_degree=rr.cfg,
            latency_s=rr.latency_s, warmup_steps=rr.warmup_steps, warmup_mode=job.scenario.warmup.mode,
            codec_backend=rr.backend_reason, base_consistency=consistency,
            torch=torch.__version__, device=str(rr.device), launch_job=launch_job))


def wait_for_links(ready: Path, line: str, timeout_s: float) -> None:
    """Between link passes: once every rank is idle, rank 0 prints ``line`` (the launcher then reshapes the links
    and creates ``ready``); every rank waits for the file, then for each other over the new links."""
    dist.barrier()
    if dist.get_rank() == 0:
        print(line, flush=True)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the links were not reshaped within {timeout_s:.0f} s ({ready} missing)")
        time.sleep(0.02)
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one rank of a pass of method runs (started by torchrun)")
    ap.add_argument("jobs", type=Path, nargs="+", help="job files, run in turn in one process group")
    a = ap.parse_args(argv)
    jobs = [Job.model_validate_json(f.read_text()) for f in a.jobs]
    job = jobs[0]
    from .xdit import import_xfuser

    import_xfuser()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=job.scenario.timeout_s)
    # xfuser and yunchang create their sub-groups without a timeout, which torch fills from these module
    # defaults (30 min); bound every collective by the scenario's timeout instead.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    dist.init_process_group(backend, timeout=timeout)
    try:
        degrees = [(j.scenario.cfg_degree(j.method), *j.scenario.degrees(j.method), j.method.pipelined,
                    j.method.patches) for j in jobs]
        for i, job in enumerate(jobs):
            if job.links_ready:
                wait_for_links(Path(job.links_ready), f"LINKS {i + 1}/{len(jobs)}", job.scenario.timeout_s)
            if dist.get_rank() == 0:
                print(f"RUN {i + 1}/{len(jobs)}", flush=True)
            with torch.no_grad():
                run(job, keep_groups=i + 1 < len(jobs) and degrees[i + 1] == degrees[i], launch_job=i)
        return 0
    except Exception:
        (Path(job.out_dir) / f"rank{dist.get_rank()}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
