"""The one wrapper around xDiT's communication calls: byte and time accounting, and compression.

xfuser's sequence parallelism exchanges activations at three points (measured on xfuser 0.7.0 + torch 2.13):
  ring K/V rotation   torch ``_templated_ring_attention`` -> ``_create_rotater`` (P2P permute or all-gather)
  Ulysses all-to-all  ``xfuser.model_executor.layers.usp._sdpa_all_to_all_single``
  output gather       ``GroupCoordinator.all_gather`` (the wrapper reassembles the sequence; skipped over the
                      ``sharded_output`` group, whose ranks keep their shards of the latents until the last step)
and PipeFusion's stage-to-stage activations at ``PipelineGroupCoordinator`` (its sends and shape messages are
counted, waits on its receives and synchronous sends timed). With a codec, each activation a stage sends on is a
residual stream of its own (:class:`PipelineStreams`): the first message of a stream goes in full precision and
seeds both ends' base, later ones are compressed; the last stage's latents back to the first are not compressed.
:class:`CommHooks` patches them while installed (a context manager restores them) and routes ring K/V through a
:class:`~compactbed.kernels.codec.ResidualCodec`: each rank compresses its own K/V once per layer, the
*compressed* payload travels the ring (P-1 hops), and every receiver decompresses it against the origin
rank's base. Patch-parallel and DistriFusion exchanges (``attention.py``) use :meth:`CommHooks.all_gather_kv`.
With ``direct``, a K/V gather is one round instead (:class:`DirectExchange`): each rank sends its payload to
every peer at once and receives theirs; the ring rotater starts it before torch computes the own block. The
step's output gather is one round as well.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..kernels.codec import ResidualCodec, StreamKey


@dataclass
class StepCounters:
    """What one rank did in one denoising step (seconds and bytes)."""

    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    comm_wait_s: float = 0.0
    codec_s: float = 0.0
    exchanges: int = 0
    layer_compute_s: dict[int, float] = field(default_factory=dict)
    comm_hidden_s: float = 0.0


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _a2a_2d(chunk: torch.Tensor) -> torch.Tensor:
    """One all-to-all chunk as [tokens, channels]: combined QKV chunks [n, b, h/P, s, d] -> [b*s, n*h/P*d];
    sequence-major chunks (the output exchange, [s/P, b, h/P, d]) -> [s/P*b, h/P*d]."""
    if chunk.dim() == 5:
        n, b, h, s, d = chunk.shape
        return chunk.permute(1, 3, 0, 2, 4).reshape(b * s, n * h * d)
    return chunk.reshape(-1, chunk.shape[-2] * chunk.shape[-1])


def _a2a_from_2d(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 6:
        _, n, b, h, s, d = x.shape
        return y.view(b, s, n, h, d).permute(2, 0, 3, 1, 4)
    return y


def kv_2d(t: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] attention layout -> [B*S, H*D] (tokens x channels) for the codec."""
    b, h, s, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b * s, h * d)


def kv_4d(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    b, h, s, d = shape
    return x.view(b, s, h, d).permute(0, 2, 1, 3)


class CommHooks:
    """Per-rank communication state of one run: current step/layer, the codec, counters."""

    def __init__(self, codec: ResidualCodec | None, rank: int, world: int, direct: bool = False):
        self.codec = codec
        self.rank, self.world, self.direct = rank, world, direct
        self.step = 0
        self.layer = 0
        self.full_precision = False      # sync warmup steps: send uncompressed to seed the bases
        self.counters = StepCounters()
        self.pipeline_patches: int | None = None     # PipeFusion: patches per step (names its residual streams)
        self.pipeline_codec: ResidualCodec | None = None     # PipeFusion: compresses the activations stage to stage
        self.sharded_output = None      # a GroupCoordinator whose output gathers are skipped (sharded latents)
        self._kv_shapes: tuple[torch.Size, torch.Size] | None = None
        self._a2a_index = 0

    # --- step bookkeeping -------------------------------------------------------------------------------
    def start_step(self, step: int, full_precision: bool) -> None:
        self.step, self.full_precision = step, full_precision
        self.counters = StepCounters()

    def enter_layer(self, layer: int) -> None:
        self.layer = layer
        self._a2a_index = 0

    # --- Ulysses all-to-all ---------------------------------------------------------------------------------
    def all_to_all(self, x: torch.Tensor, exchange) -> torch.Tensor:
        """``exchange`` (xfuser's all-to-all of a flat tensor split in ``world`` equal chunks, chunk j to rank
        j) with every chunk that crosses the wire compressed as its own residual stream."""
        p = self.world
        if self.codec is None or p == 1:
            self.count_send(x, hops=1, raw_nbytes=None, wire_fraction=(p - 1) / p)
            return self.wait(lambda: exchange(x))
        index, self._a2a_index = self._a2a_index, self._a2a_index + 1
        chunks = x.reshape(p, -1)
        views = [_a2a_2d(c.view(x.shape[1:]) if x.dim() == 6 else c.view(x.shape[0] // p, *x.shape[1:]))
                 for c in chunks]
        n, c = views[0].shape
        size = self.codec.wire_nbytes((n, c), x.dtype, self.full_precision)
        t0 = time.perf_counter()
        parts = [torch.zeros(size, dtype=torch.uint8) if dst == self.rank else
                 self.codec.encode(StreamKey(self.layer, self.rank, f"a2a{index}>{dst}"), views[dst].contiguous(),
                                   warmup=self.full_precision) for dst in range(p)]
        self.counters.codec_s += time.perf_counter() - t0
        payload = torch.cat(parts)
        self.count_send(payload, hops=1, raw_nbytes=x.numel() * x.element_size(), wire_fraction=(p - 1) / p)
        received = self.wait(lambda: exchange(payload)).reshape(p, size)
        t0 = time.perf_counter()
        out = torch.empty_like(x).reshape(p, -1)
        for src in range(p):
            if src == self.rank:
                out[src] = chunks[src]
                continue
            y = self.codec.decode(StreamKey(self.layer, src, f"a2a{index}>{self.rank}"), received[src], (n, c),
                                  x.dtype, warmup=self.full_precision)
            out[src] = _a2a_from_2d(y, x).reshape(-1)
        self.counters.codec_s += time.perf_counter() - t0
        return out.reshape(x.shape)

    # --- K/V payloads -------------------------------------------------------------------------------------
    def encode_kv(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """This rank's K/V ([B, H, S, D] each) -> one wire payload."""
        if self.codec is None:
            return torch.cat([key.flatten(), value.flatten()])
        t0 = time.perf_counter()
        parts = [self.codec.encode(StreamKey(self.layer, self.rank, name), kv_2d(t).contiguous(),
                                   warmup=self.full_precision)
                 for name, t in (("k", key), ("v", value))]
        self.counters.codec_s += time.perf_counter() - t0
        return torch.cat(parts)

    def decode_kv(self, payload: torch.Tensor, origin: int, key_shape: torch.Size, value_shape: torch.Size,
                  dtype: torch.dtype, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A payload produced by ``origin`` for ``layer`` (default: the current one) -> its K/V in attention
        layout."""
        layer = self.layer if layer is None else layer
        if self.codec is None:
            n = key_shape.numel()
            return payload[:n].view(key_shape), payload[n:].view(value_shape)
        t0 = time.perf_counter()
        out, offset = [], 0
        for name, shape in (("k", key_shape), ("v", value_shape)):
            nc = (shape[0] * shape[2], shape[1] * shape[3])
            size = self.codec.wire_nbytes(nc, dtype, self.full_precision)
            x = self.codec.decode(StreamKey(layer, origin, name), payload[offset: offset + size], nc, dtype,
                                  warmup=self.full_precision)
            out.append(kv_4d(x, shape))
            offset += size
        self.counters.codec_s += time.perf_counter() - t0
        return out[0], out[1]

    def count_send(self, payload: torch.Tensor, hops: int = 1, raw_nbytes: int | None = None,
                   wire_fraction: float = 1.0) -> None:
        """``payload`` leaves this rank ``hops`` times (``wire_fraction`` of it: an all-to-all keeps the
        own chunk); ``raw_nbytes``: what an uncompressed send would be."""
        sent = payload.numel() * payload.element_size()
        raw = sent if raw_nbytes is None else raw_nbytes
        self.counters.bytes_sent += round(sent * hops * wire_fraction)
        self.counters.bytes_uncompressed += round(raw * hops * wire_fraction)
        self.counters.exchanges += hops

    def wait(self, fn):
        t0 = time.perf_counter()
        out = fn()
        self.counters.comm_wait_s += time.perf_counter() - t0
        return out

    # --- patch parallel / DistriFusion --------------------------------------------------------------------
    def all_gather_kv(self, key: torch.Tensor, value: torch.Tensor, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every rank's (K, V) in rank order; K/V compressed by the codec when there is one."""
        payload = self.encode_kv(key, value)
        self.count_send(payload, hops=self.world - 1, raw_nbytes=_nbytes(key, value))
        if self.direct:
            gathered = DirectExchange(payload, group).wait(self)
        else:
            gathered = [torch.empty_like(payload) for _ in range(self.world)]
            self.wait(lambda: dist.all_gather(gathered, payload.contiguous(), group=group))
        out = []
        for origin, p in enumerate(gathered):
            if origin == self.rank:
                out.append((key, value))
            else:
                out.append(self.decode_kv(p, origin, key.shape, value.shape, key.dtype))
        return out

    # --- installation -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self):
        """Patch xfuser's / torch's communication points for the duration of the block."""
        import torch.distributed.tensor.experimental._context_parallel._attention as cp
        import xfuser.model_executor.layers.usp as usp
        from xfuser.core.distributed.group_coordinator import GroupCoordinator, PipelineGroupCoordinator as Pipe

        hooks = self
        orig_ring, orig_create = usp._templated_ring_attention, cp._create_rotater
        orig_a2a, orig_gather = usp._sdpa_all_to_all_single, GroupCoordinator.all_gather
        pipe_orig = {k: getattr(Pipe, k) for k in ("_pipeline_isend", "_pipeline_irecv", "_communicate_shapes",
                                                   "pipeline_send", "pipeline_recv", "get_pipeline_recv_data")}

        streams = PipelineStreams(hooks, hooks.pipeline_patches)

        def pipe_isend(coordinator, tensor):
            if hooks.pipeline_codec is None or not tensor.is_floating_point() or \
                    coordinator.rank_in_group == coordinator.world_size - 1:    # the last stage's latents
                hooks.count_send(tensor)
                return pipe_orig["_pipeline_isend"](coordinator, tensor)
            return pipe_orig["_pipeline_isend"](coordinator, streams.encode(coordinator.rank, tensor))

        def pipe_irecv(coordinator, tensor):
            if hooks.pipeline_codec is None or not tensor.is_floating_point() or coordinator.rank_in_group == 0:
                return pipe_orig["_pipeline_irecv"](coordinator, tensor)
            payload, finish = streams.receive(coordinator.prev_rank, tensor)
            return _Finishing(pipe_orig["_pipeline_irecv"](coordinator, payload), finish)

        def pipe_shapes(coordinator, tensor_send_to_next=None, recv_prev=False):
            if tensor_send_to_next is not None:     # the tensor's rank, then its sizes (int64)
                hooks.count_send(torch.empty(1 + tensor_send_to_next.dim(), dtype=torch.int64))
            return pipe_orig["_communicate_shapes"](coordinator, tensor_send_to_next, recv_prev)

        def timed(name):
            return lambda coordinator, *a, **k: hooks.wait(lambda: pipe_orig[name](coordinator, *a, **k))

        def ring_attention(group, seq_dim, op, query, key, value, *args, **kwargs):
            hooks._kv_shapes = (key.shape, value.shape)
            return orig_ring(group, seq_dim, op, query, key, value, *args, **kwargs)

        def create_rotater(pg, seq_dim, method=None):
            return _CompressingRotater(orig_create(pg, seq_dim, method), hooks, pg)

        def all_to_all(x):
            return hooks.all_to_all(x, orig_a2a)

        def all_gather(coordinator, input_, dim=0, separate_tensors=False):
            if coordinator is hooks.sharded_output:         # the latents stay sharded between steps
                return input_
            if coordinator.world_size > 1:
                hooks.count_send(input_, hops=coordinator.world_size - 1)
                if hooks.direct:                # the output gather in one round too
                    parts = DirectExchange(input_.contiguous(), coordinator.device_group).wait(hooks)
                    return parts if separate_tensors else torch.cat(parts, dim % input_.dim())
                return hooks.wait(lambda: orig_gather(coordinator, input_, dim, separate_tensors))
            return orig_gather(coordinator, input_, dim, separate_tensors)

        usp._templated_ring_attention, cp._create_rotater = ring_attention, create_rotater
        usp._sdpa_all_to_all_single, GroupCoordinator.all_gather = all_to_all, all_gather
        Pipe._pipeline_isend, Pipe._pipeline_irecv, Pipe._communicate_shapes = pipe_isend, pipe_irecv, pipe_shapes
        for name in ("pipeline_send", "pipeline_recv", "get_pipeline_recv_data"):
            setattr(Pipe, name, timed(name))
        try:
            yield self
        finally:
            usp._templated_ring_attention, cp._create_rotater = orig_ring, orig_create
            usp._sdpa_all_to_all_single, GroupCoordinator.all_gather = orig_a2a, orig_gather
            for name, fn in pipe_orig.items():
                setattr(Pipe, name, fn)


class PipelineStreams:
    """Residual streams of PipeFusion's stage-to-stage activations. Both ends name a message alike without telling
    each other: its sender, its shape, and its place among the messages of that shape on the link so far, modulo the
    patches of a step (one stream per patch and per kind of tensor)."""

    def __init__(self, hooks: CommHooks, patches: int | None = None):
        self.hooks, self.patches = hooks, patches
        self.count: dict[tuple, int] = {}

    def _key(self, src: int, shape: torch.Size) -> tuple[StreamKey, bool]:
        at = self.count.get((src, tuple(shape)), 0)
        self.count[(src, tuple(shape))] = at + 1
        key = StreamKey(at % (self.patches or 1), src, "pp" + "x".join(map(str, shape)))
        return key, key not in self.hooks.pipeline_codec.bases          # a new stream starts in full precision

    def encode(self, src: int, tensor: torch.Tensor) -> torch.Tensor:
        key, first = self._key(src, tensor.shape)
        t0 = time.perf_counter()
        payload = self.hooks.pipeline_codec.encode(key, tensor.reshape(-1, tensor.shape[-1]).contiguous(), warmup=first)
        self.hooks.counters.codec_s += time.perf_counter() - t0
        self.hooks.count_send(payload, raw_nbytes=_nbytes(tensor))
        return payload

    def receive(self, src: int, tensor: torch.Tensor):
        """A buffer for the payload, and the call that decodes it into ``tensor`` once it is in."""
        key, first = self._key(src, tensor.shape)
        nc = (tensor.numel() // tensor.shape[-1], tensor.shape[-1])
        payload = torch.empty(self.hooks.pipeline_codec.wire_nbytes(nc, tensor.dtype, first), dtype=torch.uint8)

        def finish():
            t0 = time.perf_counter()
            decoded = self.hooks.pipeline_codec.decode(key, payload, nc, tensor.dtype, warmup=first)
            tensor.copy_(decoded.view(tensor.shape))
            self.hooks.counters.codec_s += time.perf_counter() - t0

        return payload, finish


class _Finishing:
    """A receive whose ``wait`` also runs ``finish`` (decoding into the caller's buffer)."""

    def __init__(self, work, finish):
        self.work, self.finish = work, finish

    def wait(self, *args):
        self.work.wait(*args)
        if self.finish is not None:
            self.finish()
            self.finish = None
        return True

    def is_completed(self) -> bool:
        return self.work.is_completed()


class DirectExchange:
    """One round of a K/V gather: ``payload`` sent to every peer of ``group`` and theirs received, all posted at
    once (gloo runs the pairs in parallel; a send completes once its peer has posted the receive)."""

    def __init__(self, payload: torch.Tensor, group):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.received = [payload if r == rank else torch.empty_like(payload) for r in range(size)]
        ops = []
        for r in range(size):
            if r != rank:
                peer = dist.get_global_rank(group, r)
                ops += [dist.P2POp(dist.isend, payload, peer, group),
                        dist.P2POp(dist.irecv, self.received[r], peer, group)]
        self.started = time.perf_counter()
        self.works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self, hooks: CommHooks) -> list[torch.Tensor]:
        """Every rank's payload in group rank order. The wait is communication time; what the transfers took
        beyond it ran behind this rank's compute (``comm_hidden_s``)."""
        t0 = time.perf_counter()
        hooks.wait(lambda: [w.wait() for w in self.works])
        hooks.counters.comm_hidden_s += max(0.0, t0 - self.started)
        self.works = []
        return self.received


class _CompressingRotater:
    """Wraps torch's ring rotater: compress own K/V once, forward compressed payloads, decode per origin. With
    ``hooks.direct``, the first call starts one round to every peer (:class:`DirectExchange`) instead, and later
    calls send nothing."""

    def __init__(self, inner, hooks: CommHooks, pg):
        self.inner, self.hooks, self.pg = inner, hooks, pg
        self.rank, self.size = dist.get_rank(pg), dist.get_world_size(pg)
        self.exchanged = 0
        self.received: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self.direct: DirectExchange | None = None
        self.gathered: list[torch.Tensor] | None = None

    def exchange_buffers(self, flat: torch.Tensor) -> None:
        key_shape, value_shape = self.hooks._kv_shapes
        if self.hooks.direct:
            if self.exchanged == 0:
                self.dtype = flat.dtype
                n = key_shape.numel()
                payload = self.hooks.encode_kv(flat[:n].view(key_shape), flat[n:].view(value_shape))
                self.hooks.count_send(payload, hops=self.size - 1, raw_nbytes=flat.numel() * flat.element_size())
                self.direct = DirectExchange(payload, self.pg)
            self.exchanged += 1
            return
        if self.exchanged == 0:
            self.dtype = flat.dtype
            n = key_shape.numel()
            payload = self.hooks.encode_kv(flat[:n].view(key_shape), flat[n:].view(value_shape))
        else:
            payload = self.received          # forward the payload as received: no re-compression
        self.hooks.count_send(payload, raw_nbytes=flat.numel() * flat.element_size())
        self.inner.exchange_buffers(payload)
        self.exchanged += 1

    def next_buffer(self) -> torch.Tensor:
        origin = (self.rank - self.exchanged) % self.size
        if self.hooks.direct:
            if self.gathered is None:
                self.gathered = self.direct.wait(self.hooks)
            payload = self.gathered[origin]
        else:
            payload = self.hooks.wait(self.inner.next_buffer)
            self.received = payload
        key_shape, value_shape = self.hooks._kv_shapes
        k, v = self.hooks.decode_kv(payload, origin, key_shape, value_shape, self.dtype)
        return torch.cat([k.flatten(), v.flatten()])
