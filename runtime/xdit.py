"""Importing and initializing xfuser (xDiT) 0.7.x, on GPUs as is and on CPU over gloo.

xfuser 0.7.0 assumes CUDA at import time. :func:`import_xfuser` applies six narrow patches when torch has no
accelerator (each a no-op on CUDA hosts), measured in the project's feasibility work:
  P0  envs.get_device_version / get_torch_distributed_backend raise on CPU -> None / "gloo"
  P1  has_long_ctx_attn is False without CUDA, so yunchang's SP groups are never made -> True
  P2  usp.PROCESS_GROUP is None without CUDA -> yunchang's process groups
  P3  ring attention needs an LSE-returning attention op; on CPU use aten's CPU flash kernel
  P4  PipeFusion's shape exchange calls torch.cuda.synchronize -> no-op
  P5  PipeFusion deadlocks on gloo, whose sends complete only once the peer posted its receive: its shape exchange
      waits on its sends over one group for both directions -> shapes go over the per-direction groups, sends are
      not waited on (their requests and tensors are kept alive until complete), and so are the data sends
and, only when the triton wheel is absent, an import-only stand-in while xfuser imports
(its sparge_attention module decorates kernels with @triton.jit at import time).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import cache

import torch


def _load_envs():
    """Load xfuser.envs alone: xfuser/__init__ imports config.py, which reads CUDA_VERSION at import."""
    if "xfuser" in sys.modules:
        return importlib.import_module("xfuser.envs")
    spec = importlib.util.find_spec("xfuser")
    if spec is None:
        raise ImportError("xfuser is not installed (pip install 'xfuser>=0.7,<0.8')")
    pkg = types.ModuleType("xfuser")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules["xfuser"] = pkg
    try:
        return importlib.import_module("xfuser.envs")
    finally:
        del sys.modules["xfuser"]


def _triton_stand_in() -> dict[str, types.ModuleType]:
    tl = types.ModuleType("triton.language")
    tl.constexpr = object
    tr = types.ModuleType("triton")
    tr.__version__ = "0.0.0-import-only"
    tr.language = tl
    tr.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    tr.autotune = tr.heuristics = lambda *a, **k: (lambda f: f)
    tr.Config = lambda *a, **k: None
    tr.cdiv = lambda a, b: -(-a // b)
    tr.next_power_of_2 = lambda n: 1 << (int(n) - 1).bit_length()
    return {"triton": tr, "triton.language": tl}


@cache
def import_xfuser() -> types.ModuleType:
    """Import xfuser with the CPU patches when needed; returns the xfuser module. Idempotent."""
    envs = _load_envs()
    cpu = envs.get_device_name() == "cpu"
    if cpu:
        envs.get_device_version = lambda: None
        envs.get_torch_distributed_backend = lambda: "gloo"
        envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True
    if importlib.util.find_spec("triton") is None:
        import diffusers, diffusers.models, diffusers.pipelines, diffusers.loaders.peft  # noqa: E401,F401
        stand_in = _triton_stand_in()
        sys.modules.update(stand_in)
        try:
            import xfuser
        finally:
            for name in stand_in:
                sys.modules.pop(name, None)
    else:
        import xfuser
    if cpu:
        from yunchang.globals import PROCESS_GROUP

        import xfuser.core.distributed.group_coordinator as gc
        import xfuser.model_executor.layers.usp as usp
        from xfuser.core.distributed import attention_backend as ab

        usp.PROCESS_GROUP = PROCESS_GROUP
        flash = ab.ATTENTION_FUNCTION_REGISTRY[ab.AttentionBackendType.SDPA_FLASH]

        def sdpa_flash_cpu(query, key, value, dropout_p, is_causal, attention_kwargs=None):
            if query.device.type != "cpu":
                return flash(query, key, value, dropout_p, is_causal, attention_kwargs)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal)
            return out, lse

        ab.ATTENTION_FUNCTION_REGISTRY[ab.AttentionBackendType.SDPA_FLASH] = sdpa_flash_cpu
        gc.synchronize = lambda *a, **k: None
        _gloo_pipeline(gc.PipelineGroupCoordinator)
    return xfuser


def _gloo_pipeline(coordinator) -> None:
    """P5: PipeFusion's point-to-point exchange without waiting on sends (gloo completes a send only once its peer
    posted the receive; two stages sending shapes at once would wait on each other)."""
    import torch.distributed as dist

    def send_group(self):
        return self.device_groups[self.rank_in_group % 2] if self.world_size == 2 else self.device_group

    def recv_group(self):
        return self.device_groups[(self.rank_in_group + 1) % 2] if self.world_size == 2 else self.device_group

    def keep(self, work, tensor):
        pending = [(w, t) for w, t in getattr(self, "_gloo_pending_sends", []) if not w.is_completed()]
        self._gloo_pending_sends = pending + [(work, tensor)]
        return work

    def communicate_shapes(self, tensor_send_to_next=None, recv_prev=False):
        if tensor_send_to_next is not None:
            dims = torch.tensor([tensor_send_to_next.dim()], dtype=torch.int64)
            shape = torch.tensor(list(tensor_send_to_next.size()), dtype=torch.int64)
            keep(self, dist.isend(dims, self.next_rank, group=send_group(self)), dims)
            keep(self, dist.isend(shape, self.next_rank, group=send_group(self)), shape)
        if recv_prev:
            dims = torch.empty(1, dtype=torch.int64)
            dist.irecv(dims, self.prev_rank, group=recv_group(self)).wait()
            shape = torch.empty(int(dims.item()), dtype=torch.int64)
            dist.irecv(shape, self.prev_rank, group=recv_group(self)).wait()
            return torch.Size(shape.tolist())
        return torch.Size([0, 0, 0])

    isend = coordinator._pipeline_isend
    coordinator._communicate_shapes = communicate_shapes
    coordinator._pipeline_isend = lambda self, tensor: keep(self, isend(self, tensor), tensor)
