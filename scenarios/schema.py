"""The scenario file format: one typed schema that reads ``scenarios/*.yaml``.

The bottom layer of the package: every folder may import it, it imports only link and codec values
(``netem.profiles``, ``kernels.spec``). Every other module receives the validated :class:`Scenario` (or a piece
of it), never raw YAML.
Bad input raises :class:`ScenarioError` with one line per problem, naming the field and what is allowed.
"""

from __future__ import annotations

import itertools
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..kernels.spec import CodecSpec, CompressorSpec
from ..netem.profiles import LinkSpec, named_profiles, resolve_link

MAX_SCENARIO_BYTES = 1_000_000
MAX_EMULATED_NODES = 64
TINY_VIDEO = "tiny_cogvideox"     # the video DiT built from its config (runtime/video.py)
VIDEO_MODELS = (TINY_VIDEO, "cogvideox-5b", "hunyuanvideo")     # video DiTs: their runtime gathers the output every step
MAX_PREDICTED_NODES = 4096

Comm = Literal["ring", "ulysses", "usp", "patch", "distrifusion", "pipefusion"]
WarmupMode = Literal["sync", "local"]


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_PROFILE_NAME = r"^[a-z0-9][a-z0-9_.-]{0,39}$"


class HardwareSpec(_Strict):
    """The GPU cluster that ``scenario predict`` models (emulated runs use the host they run on): each rank a
    ``device``, ``gpus_per_node`` consecutive ranks per machine joined by ``intra_node``, machines by their
    ``inter_node`` NICs and, where the scenario sets links, its shaped paths. Names are the shipped profiles
    (``simulator/profiles``; ``scenario profile`` adds measured ones)."""

    device: str = Field(pattern=_PROFILE_NAME)
    gpus_per_node: int = Field(1, ge=1, le=64)
    intra_node: str = Field("pcie4", pattern=_PROFILE_NAME)
    inter_node: str = Field("ethernet_shaped", pattern=_PROFILE_NAME)


class RemoteSpec(_Strict):
    """How the ``hosts:`` form reaches and uses its machines (SSH, key-based and non-interactive)."""

    python: str = Field("python3", max_length=400, description="the interpreter with compactbed on every host")
    workdir: str = Field("/tmp/compactbed", max_length=400, description="a folder per run is made under it on each "
                                                                         "host and removed afterwards")
    known_hosts: str | None = Field("~/.ssh/known_hosts", max_length=400,
                                    description="host keys to verify the hosts against; null: do not verify")
    shape: bool = Field(True, description="shape each host's NIC with the scenario's links (tc, as root or via "
                                          "sudo -n); false: the network as it is")
    connect_timeout_s: float = Field(10.0, gt=0, le=600)

    @field_validator("workdir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or ".." in v.split("/"):
            raise ValueError("workdir is an absolute path without '..'")
        return v


class NodeSpec(_Strict):
    """One node (rank). ``link`` is its access link (uplink and downlink, see ``Scenario.topology``);
    ``host`` is the address of a real machine (the ``hosts:`` form), empty for emulated nodes;
    ``compute_scale`` slows (>1) or speeds up (<1) this node in predictions (heterogeneous clusters)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,15}$")
    link: LinkSpec | None = None
    host: str | None = Field(None, pattern=r"^[A-Za-z0-9.:_-]{1,253}$")
    interface: str = Field("eth0", pattern=r"^[A-Za-z0-9_.:-]{1,15}$", description="hosts form: shaped NIC")
    ssh_user: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_.-]{0,31}$", description="hosts form: login (default: "
                                                                                        "the coordinator's user)")
    ssh_port: int = Field(22, ge=1, le=65535)
    ssh_key: str | None = Field(None, max_length=400, description="hosts form: private key file (default: ssh's own)")
    compute_scale: float = Field(1.0, gt=0, le=1000)
    device: str | None = Field(None, pattern=_PROFILE_NAME, description="predictions: this rank's GPU (overrides "
                                                                        "hardware.device)")
    nic: str | None = Field(None, pattern=_PROFILE_NAME, description="predictions: the NIC of the machine this rank "
                                                                     "is the first GPU of (overrides "
                                                                     "hardware.inter_node)")

    @field_validator("link", mode="before")
    @classmethod
    def _link(cls, v: Any) -> Any:
        return None if v is None else resolve_link(v)


class LinkOverride(_Strict):
    """Impairments of one directed link ``src -> dst`` (node names or indices): a path of its own, shaped apart
    from both nodes' access links."""

    src: str | int
    dst: str | int
    spec: LinkSpec

    @model_validator(mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, dict) and "spec" not in v:
            v = dict(v)
            src, dst = v.pop("src", None), v.pop("dst", None)
            return {"src": src, "dst": dst, "spec": resolve_link(v)}
        return v


class ModelSpec(_Strict):
    """``name: tiny_flux_mnist`` is the shipped model; ``path`` loads a local diffusers folder instead: a
    ``FluxPipeline`` folder (e.g. FLUX.1-dev, conditioned by ``prompts``) or a retrained tiny model folder.
    ``max_sequence_length`` is the T5 prompt length of pipeline folders."""

    name: str = "tiny_flux_mnist"
    path: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_sequence_length: int = Field(512, ge=1, le=4096)


class ParallelSpec(_Strict):
    """Degrees of xDiT's hybrid parallelism for ``usp`` methods; their product is the node count. Other methods take
    their sequence-parallel degrees from their pattern, and CFG parallel from their own ``cfg_parallel``."""

    cfg_degree: int = Field(1, ge=1, le=2, description="2: the conditional and unconditional halves of the guidance "
                                                        "batch run on two groups of ranks (xDiT's CFG parallel)")
    pipefusion_degree: int | None = Field(None, ge=1, le=MAX_PREDICTED_NODES,
                                          description="stages of `pipefusion` methods, the nodes of each splitting its "
                                                      "tokens by ulysses_degree x ring_degree (default: a node a stage)")
    ulysses_degree: int = Field(1, ge=1, le=MAX_PREDICTED_NODES)
    ring_degree: int | None = Field(None, ge=1, le=MAX_PREDICTED_NODES)


class WarmupSpec(_Strict):
    """``sync``: the first ``steps`` steps send full precision over the network; ``local``: every rank
    computes the whole sequence for those steps with no communication and seeds all bases itself."""

    mode: WarmupMode = "sync"
    steps: int = Field(1, ge=0, le=100)


class MethodSpec(_Strict):
    """One method to compare: a communication pattern plus, for compressed methods, a codec. What a pattern
    exchanges is answered by the properties below (one table, :data:`_PATTERNS`), never by comparing ``comm``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.:-]{0,39}$")
    comm: Comm
    codec: CodecSpec | None = None
    exchange: Literal["ring", "direct"] = Field(
        "ring", description="how a synchronous K/V gather travels: ring (gloo's all-gather, P-1 hops in sequence) "
                            "or direct (each rank sends its payload to every peer at once: one round; on the ring "
                            "pattern its own attention block computes while the payloads are in flight)")

    patches: int | None = Field(None, ge=1, le=1024, description="pipefusion: patches the image is cut into (default: "
                                                                  "one per stage)")
    cfg_parallel: bool = Field(
        False, description="xDiT's CFG parallel: the guidance batch's two halves run on two groups of half the nodes "
                           "each (the pattern's sequence parallelism inside a group); the two velocities are "
                           "exchanged once per step (``usp`` takes it from parallel.cfg_degree)")

    @model_validator(mode="after")
    def _direct_gathers(self) -> "MethodSpec":
        if self.patches is not None and not self.pipelined:
            raise ValueError(f"patches is for comm 'pipefusion', not {self.comm!r}")
        if self.cfg_parallel and self.hybrid_degrees:
            raise ValueError("comm 'usp' takes its CFG degree from the scenario's parallel.cfg_degree, not from "
                             "cfg_parallel")
        if self.exchange == "direct" and not self.synchronous_gather:
            raise ValueError(f"exchange 'direct' is for the synchronous K/V gathers (comm ring or patch), not "
                             f"comm {self.comm!r}")
        return self

    @property
    def compressed(self) -> bool:
        return self.codec is not None and self.codec.compressor.kind != "identity"

    @property
    def gathers_kv(self) -> bool:
        """Each layer all-gathers K/V over the ranks (ring attention, patch parallel, DistriFusion)."""
        return _PATTERNS[self.comm].gathers_kv

    @property
    def stale_kv(self) -> bool:
        """Attention uses the previous step's K/V, gathered asynchronously while computing (DistriFusion)."""
        return _PATTERNS[self.comm].stale_kv

    @property
    def synchronous_gather(self) -> bool:
        """Each layer waits for a fresh K/V all-gather (ring attention, patch parallel)."""
        return self.gathers_kv and not self.stale_kv

    @property
    def all_to_all(self) -> bool:
        """Each layer redistributes Q/K/V by heads with all-to-alls (Ulysses, USP)."""
        return _PATTERNS[self.comm].all_to_all

    @property
    def pipelined(self) -> bool:
        """xDiT's PipeFusion: layers split into one stage per rank, the image into patches that stream through them,
        attention over the other patches' stale K/V (never exchanged); activations go stage to stage."""
        return _PATTERNS[self.comm].pipelined

    @property
    def own_attention_exchange(self) -> bool:
        """The exchange runs in this project's attention processor, not xfuser's (patch parallel, DistriFusion)."""
        return _PATTERNS[self.comm].own_attention_exchange

    @property
    def warms_up(self) -> bool:
        """The first steps are a warmup (full precision or local): compressed methods seed their bases there,
        DistriFusion its stale K/V and PipeFusion its K/V cache (the whole image through the pipeline)."""
        return self.compressed or self.stale_kv or self.pipelined

    @property
    def hybrid_degrees(self) -> bool:
        """Ulysses and ring degrees both come from the scenario's ``parallel:`` (USP)."""
        return _PATTERNS[self.comm].split == "usp"

    def degrees(self, world: int, usp: tuple[int, int]) -> tuple[int, int]:
        """(ulysses_degree, ring_degree) on ``world`` ranks; ``usp``: the scenario's degrees for ``usp``."""
        return _PATTERNS[self.comm].degrees(world, usp)


class _Pattern(NamedTuple):
    gathers_kv: bool = False
    stale_kv: bool = False
    all_to_all: bool = False
    own_attention_exchange: bool = False
    pipelined: bool = False
    split: Literal["ring", "ulysses", "usp", "none"] = "ring"

    def degrees(self, world: int, usp: tuple[int, int]) -> tuple[int, int]:
        return {"ring": (1, world), "ulysses": (world, 1), "usp": usp, "none": (1, 1)}[self.split]


_PATTERNS: dict[str, _Pattern] = {
    "ring": _Pattern(gathers_kv=True),
    "patch": _Pattern(gathers_kv=True, own_attention_exchange=True),
    "distrifusion": _Pattern(gathers_kv=True, stale_kv=True, own_attention_exchange=True),
    "ulysses": _Pattern(all_to_all=True, split="ulysses"),
    "usp": _Pattern(all_to_all=True, split="usp"),
    "pipefusion": _Pattern(pipelined=True, split="none"),
}


def _codec(kind: str, residual: str = "ef", **kw: Any) -> CodecSpec:
    return CodecSpec(compressor=CompressorSpec(kind=kind, **kw), residual=residual)


METHOD_PRESETS: dict[str, MethodSpec] = {m.name: m for m in [
    MethodSpec(name="ring", comm="ring"),
    MethodSpec(name="ulysses", comm="ulysses"),
    MethodSpec(name="usp", comm="usp"),
    MethodSpec(name="patch", comm="patch"),
    MethodSpec(name="distrifusion", comm="distrifusion"),
    MethodSpec(name="cfg", comm="ring", cfg_parallel=True),
    MethodSpec(name="pipefusion", comm="pipefusion"),
    MethodSpec(name="compact-1bit-pipefusion", comm="pipefusion", codec=_codec("1bit")),
    MethodSpec(name="compact-1bit", comm="ring", codec=_codec("1bit")),
    MethodSpec(name="compact-2bit", comm="ring", codec=_codec("2bit")),
    MethodSpec(name="compact-lowrank", comm="ring", codec=_codec("lowrank", rank=8)),
    MethodSpec(name="compact-lowrank-int4", comm="ring", codec=_codec("lowrank", rank=32, int4=True)),
    MethodSpec(name="compact-sparse", comm="ring", codec=_codec("sparse", keep=1, group=4)),
    MethodSpec(name="compact-1bit-direct", comm="ring", codec=_codec("1bit"), exchange="direct"),
    MethodSpec(name="compact-2bit-direct", comm="ring", codec=_codec("2bit"), exchange="direct"),
    MethodSpec(name="compact-1bit-stale", comm="distrifusion", codec=_codec("1bit")),
    MethodSpec(name="compact-1bit-patch", comm="patch", codec=_codec("1bit")),
    MethodSpec(name="compact-1bit-ulysses", comm="ulysses", codec=_codec("1bit")),
    MethodSpec(name="compact-1bit-cfg", comm="ring", codec=_codec("1bit"), cfg_parallel=True),
    MethodSpec(name="compact-1bit-noef", comm="ring", codec=_codec("1bit", "no_ef")),
    MethodSpec(name="compact-1bit-naive", comm="ring", codec=_codec("1bit", "naive")),
]}


class Scenario(_Strict):
    """A complete, reproducible description of one comparison."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = Field("", max_length=2000)
    nodes: list[NodeSpec] = Field(min_length=1, max_length=MAX_PREDICTED_NODES)
    link: LinkSpec = Field(default_factory=lambda: named_profiles()["ethernet_1g"])
    links: list[LinkOverride] = Field(default_factory=list, max_length=100_000)
    model: ModelSpec = ModelSpec()
    resolution: int = Field(16, ge=4, le=8192, description="image side in pixels (tiny model: 16); the width if "
                                                           "height is given")
    height: int | None = Field(None, ge=4, le=8192, description="image height in pixels (default: square)")
    frames: int = Field(1, ge=1, le=1024, description="video frames (predictions of video models)")
    labels: list[int] | None = Field(None, min_length=1, max_length=1024,
                                     description="one digit class per image, or a count (digits 0-9 cycling); "
                                                 "default 0-9")
    prompts: list[str] | None = Field(None, min_length=1, max_length=1024,
                                      description="one prompt per image (pipeline folders; replaces labels)")
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(1.5, ge=0, le=50)
    parallel: ParallelSpec = ParallelSpec()
    methods: list[MethodSpec] = Field(min_length=1, max_length=64)
    warmup: WarmupSpec = WarmupSpec()
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=100)
    hardware: HardwareSpec | None = None
    remote: RemoteSpec = RemoteSpec()
    topology: Literal["star", "mesh"] = Field(
        "star", description="star: a node's link is its access link to a hub, one shared uplink for all it sends "
                            "and one shared downlink for all it receives; a path adds both nodes' delays. mesh: every "
                            "directed link is shaped on its own (the sender's link, else the receiver's)")
    congestion_control: str = Field("cubic", pattern=r"^[a-z0-9_]{1,16}$",
                                    description="TCP congestion control inside every emulated node (cubic: the "
                                                "Linux default, reno where the namespace may not use it; host: "
                                                "leave the host's own)")
    output_gather: Literal["end", "step"] | None = Field(
        None, description="when the ranks gather the latents: end (each rank keeps its shard between steps, the "
                          "update being per token, and they are gathered once after the last step) or step (after "
                          "every step, as xDiT's pipelines do). Default: end; step for video models and PipeFusion")
    output: str = Field("results", max_length=400)
    timeout_s: float = Field(120.0, gt=0, le=3600, description="limit on any single collective")

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("nodes is a count or a list of nodes")
        if isinstance(v, int):
            if not 1 <= v <= MAX_PREDICTED_NODES:
                raise ValueError(f"node count must be between 1 and {MAX_PREDICTED_NODES}, got {v}")
            return [{"name": f"node{i}"} for i in range(v)]
        return v

    @field_validator("link", mode="before")
    @classmethod
    def _link(cls, v: Any) -> Any:
        return resolve_link(v)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            if isinstance(item, str):
                if item not in METHOD_PRESETS:
                    raise ValueError(f"unknown method {item!r}; presets: {', '.join(METHOD_PRESETS)} "
                                     f"(or a mapping with name, comm, codec)")
                out.append(METHOD_PRESETS[item])
            else:
                out.append(item)
        return out

    @field_validator("labels", mode="before")
    @classmethod
    def _label_count(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            if not 1 <= v <= 1024:
                raise ValueError(f"label count must be between 1 and 1024, got {v}")
            return [i % 10 for i in range(v)]
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[int] | None) -> list[int] | None:
        bad = [x for x in v or [] if not 0 <= x <= 9]
        if bad:
            raise ValueError(f"labels are digit classes 0-9, got {bad[:5]}")
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(len(p) > 2000 or "\x00" in p for p in v):
            raise ValueError("a prompt is at most 2000 characters of text")
        return v

    @field_validator("resolution")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"resolution must be even (images are cut into 2x2 patches), got {v}")
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        p = PurePosixPath(v)
        if p.is_absolute() or ".." in p.parts or "\\" in v or "\x00" in v:
            raise ValueError("output must be a relative path inside the working directory, without '..' "
                             "(use `scenario run --output DIR` for another place)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Scenario":
        n = len(self.nodes)
        names = [m.name for m in self.methods]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"method names must be unique, repeated: {', '.join(dup)}")
        node_names = [x.name for x in self.nodes]
        if len(set(node_names)) != n:
            raise ValueError("node names must be unique")
        for o in self.links:
            for end in (o.src, o.dst):
                if isinstance(end, int) and not 0 <= end < n or isinstance(end, str) and end not in node_names:
                    raise ValueError(f"links: node {end!r} is not one of the {n} nodes")
        u, ring = self.usp_degrees
        cfg = self.parallel.cfg_degree
        if any(m.hybrid_degrees for m in self.methods) and cfg * u * ring != n:
            raise ValueError(f"parallel: cfg_degree x ulysses_degree x ring_degree = {cfg} x {u} x {ring} must equal "
                             f"the node count {n}")
        for m in self.methods:
            u, r = self.degrees(m)
            if m.pipelined and self.stages(m) * u * r * self.cfg_degree(m) != n:
                raise ValueError(f"method {m.name}: pipefusion_degree x ulysses_degree x ring_degree = "
                                 f"{self.stages(m)} x {u} x {r} must equal the node count {n}"
                                 + (" / 2 (CFG)" if self.cfg_degree(m) > 1 else ""))
        if self.output_gather == "end" and self.video:
            raise ValueError(f"output_gather: a video model ({self.model.name}) is unpatchified from the whole "
                             f"sequence, so it gathers every step (output_gather: step)")
        if any(m.pipelined for m in self.methods) and self.warmup.steps < 1:
            raise ValueError("PipeFusion fills its K/V cache in warmup steps: warmup.steps must be at least 1")
        split = [m.name for m in self.methods if self.cfg_degree(m) > 1]
        if split and n % 2:
            raise ValueError(f"CFG parallel ({', '.join(split)}) splits the nodes into two groups: the node count "
                             f"must be even, got {n}")
        if split and self.guidance == 1.0:
            raise ValueError(f"CFG parallel ({', '.join(split)}) runs the conditional and unconditional passes of "
                             f"classifier-free guidance apart; with guidance 1 there is only one pass per step")
        a2a = [m.name for m in self.methods if m.compressed and m.all_to_all]
        if a2a and self.warmup.mode == "local":
            raise ValueError(f"warmup mode 'local' seeds ring/patch K/V bases only; compressed all-to-all methods "
                             f"({', '.join(a2a)}) need warmup mode 'sync'")
        if self.prompts is not None and self.labels is not None:
            raise ValueError("give labels (the tiny digit model) or prompts (a pipeline folder), not both")
        if self.prompts is not None and self.model.path is None:
            raise ValueError("prompts condition a pipeline folder given as model.path; the shipped tiny model is "
                             "conditioned on digit labels (use `labels:`)")
        self._check_shipped_model()
        hosts = [x.host for x in self.nodes if x.host]
        if hosts and len(hosts) != n:
            raise ValueError("either every node has a `host` (real machines) or none does (emulation)")
        if hosts:
            groups = [list(g) for _, g in itertools.groupby(hosts)]
            if len(groups) != len(set(hosts)) or len({len(g) for g in groups}) != 1:
                raise ValueError("nodes on one host (its GPUs or processes) must be consecutive, and every host must "
                                 "carry as many")
        return self

    def _check_shipped_model(self) -> None:
        """The shipped tiny models (the digit model, the video model): node count, token and head splits, and what
        each runs."""
        if self.model.path is not None or self.model.name not in ("tiny_flux_mnist", TINY_VIDEO):
            return
        n, video = len(self.nodes), self.model.name == TINY_VIDEO
        if not video and (self.frames != 1 or self.height is not None):
            raise ValueError("the tiny model makes square images: frames and height are for predictions of "
                             "published models (model: {name: cogvideox-5b}) and the video model (tiny_cogvideox)")
        if video and self.height is not None:
            raise ValueError(f"{TINY_VIDEO} makes square frames: no height")
        image, heads, layers = (self.resolution // 2) ** 2 * self.frames, 4, 2 if video else 4
        if n > MAX_EMULATED_NODES:
            raise ValueError(f"the tiny model runs on at most {MAX_EMULATED_NODES} emulated nodes, got {n} "
                             f"(`scenario predict` models up to {MAX_PREDICTED_NODES} nodes of a published model, "
                             f"e.g. model: {{name: flux.1-dev}})")
        for m in self.methods:
            u, r = self.degrees(m)
            if video and (m.own_attention_exchange or m.pipelined):
                raise ValueError(f"method {m.name}: {TINY_VIDEO} runs xDiT's sequence parallelism (ring, Ulysses, "
                                 f"USP, CFG parallel) with or without the codec, not patch, DistriFusion or PipeFusion")
            if video and m.warms_up and self.warmup.mode == "local":
                raise ValueError(f"method {m.name}: {TINY_VIDEO} warms up in warmup mode 'sync'")
            stages = self.stages(m)
            if m.pipelined and stages > layers:
                raise ValueError(f"method {m.name}: PipeFusion gives each of the {stages} ranks at least one of the "
                                 f"tiny model's {layers} layers (use at most {layers} nodes, {2 * layers} with CFG "
                                 f"parallel)")
            if image % (u * r):       # label tokens that do not divide stay whole on every rank
                raise ValueError(f"method {m.name}: {image} image tokens must divide by the sequence-parallel "
                                 f"degree {u * r} (choose another resolution)")
            if heads % u:
                raise ValueError(f"method {m.name}: the tiny model's {heads} heads must divide by the "
                                 f"Ulysses degree {u}")

    # --- derived values -------------------------------------------------------------------------------
    @property
    def on_hosts(self) -> bool:
        """True for the ``hosts:`` form: every node is a real machine."""
        return all(x.host for x in self.nodes)

    @property
    def machines(self) -> list[list[int]]:
        """The hosts form's machines, each the ranks on it (consecutive nodes with one address)."""
        return [[k for k, _ in g] for _, g in itertools.groupby(enumerate(self.nodes), key=lambda kv: kv[1].host)]

    @property
    def conditions(self) -> list:
        """What conditions each image: its prompt (pipeline folders) or its digit label (tiny model)."""
        if self.prompts is not None:
            return list(self.prompts)
        return list(self.labels) if self.labels is not None else list(range(10))

    @property
    def images(self) -> int:
        """Images generated per method and seed."""
        return len(self.conditions)

    @property
    def world_size(self) -> int:
        return len(self.nodes)

    @property
    def usp_degrees(self) -> tuple[int, int]:
        """(ulysses, ring) degrees of ``usp`` methods; the ring degree defaults to nodes / (cfg x ulysses)."""
        u = self.parallel.ulysses_degree
        return u, self.parallel.ring_degree or max(self.world_size // (u * self.parallel.cfg_degree), 1)

    def cfg_degree(self, method: MethodSpec) -> int:
        """Groups the guidance batch is split over (xDiT's CFG parallel): 1 or 2."""
        if method.hybrid_degrees:
            return self.parallel.cfg_degree
        return 2 if method.cfg_parallel else 1

    def degrees(self, method: MethodSpec) -> tuple[int, int]:
        """(ulysses_degree, ring_degree) that ``method`` runs with inside its CFG group (PipeFusion: in a stage)."""
        group = max(self.world_size // self.cfg_degree(method), 1)
        if method.pipelined:
            u = self.parallel.ulysses_degree if self.parallel.pipefusion_degree else 1
            return u, max(group // (self.stages(method) * u), 1)
        return method.degrees(group, self.usp_degrees)

    def gathers_each_step(self, method: MethodSpec) -> bool:
        """Whether ``method``'s ranks gather the whole output after every step (xDiT's way; video models,
        PipeFusion, ``output_gather: step``) rather than keep their shards of the latents until the last."""
        return self.output_gather == "step" or self.video or method.pipelined

    @property
    def video(self) -> bool:
        """A video DiT (the shipped tiny one, or a published shape)."""
        return self.model.path is None and self.model.name in VIDEO_MODELS

    def stages(self, method: MethodSpec) -> int:
        """PipeFusion's stages (1 for other methods)."""
        if not method.pipelined:
            return 1
        return self.parallel.pipefusion_degree or max(self.world_size // self.cfg_degree(method), 1)

    @property
    def sets_links(self) -> bool:
        """The file itself gives link impairments (``link``, a node's link or ``links``), not only the default."""
        return "link" in self.model_fields_set or bool(self.links) or any(x.link for x in self.nodes)

    def access_link(self, k: int) -> LinkSpec:
        """Node k's access link: its own ``link``, else the scenario's."""
        return self.nodes[k].link or self.link

    def overridden(self, src: int, dst: int) -> LinkSpec | None:
        """The ``links`` entry for src -> dst (the last one given), if any."""
        names = [x.name for x in self.nodes]
        for o in reversed(self.links):
            s = o.src if isinstance(o.src, int) else names.index(o.src)
            d = o.dst if isinstance(o.dst, int) else names.index(o.dst)
            if (s, d) == (src, dst):
                return o.spec
        return None

    def link_between(self, src: int, dst: int) -> LinkSpec:
        """The directed path src -> dst: an override, else (star) the sender's access link then the receiver's,
        else (mesh) the sender's link, else the receiver's, else the scenario default."""
        over = self.overridden(src, dst)
        if over is not None:
            return over
        if self.topology == "star":
            return self.access_link(src).then(self.access_link(dst))
        return self.nodes[src].link or self.nodes[dst].link or self.link

    def access_links(self, unlimited_rate: bool = False, ideal: bool = False) -> list[LinkSpec] | None:
        """Each node's access link (a star; None for a mesh): the rate lifted for the bound pass, nothing at all
        for the ideal pass."""
        if self.topology != "star":
            return None
        if ideal:
            return [LinkSpec()] * self.world_size
        links = [self.access_link(k) for k in range(self.world_size)]
        return [x.model_copy(update={"rate_mbit": None}) for x in links] if unlimited_rate else links

    def own_paths(self) -> list[tuple[int, int]]:
        """Directed paths shaped on their own, outside the access links: the ``links`` overrides."""
        n = self.world_size
        return [(i, j) for i in range(n) for j in range(n) if i != j and self.overridden(i, j) is not None]

    def probe_paths(self) -> list[tuple[int, int]]:
        """The directed paths whose probes check every shaped link once: in a mesh each path; in a star each
        node's uplink (to the node with the fastest downlink, the next one among equals) and downlink (from the
        fastest uplink, the previous one among equals), over paths not shaped on their own, so each access link sets
        its path's rate where it can and a uniform star takes n probes instead of n(n-1); plus the paths shaped on
        their own."""
        n = self.world_size
        if self.topology != "star":
            return [(i, j) for i in range(n) for j in range(n) if i != j]

        def speed(k: int) -> float:
            rate = self.access_link(k).rate_mbit
            return float("inf") if rate is None else rate

        own = set(self.own_paths())
        paths = set(own)
        for k in range(n):
            ups = [j for d in range(1, n) if (k, j := (k + d) % n) not in own]            # k's uplink
            downs = [i for d in range(1, n) if (i := (k - d) % n, k) not in own]         # k's downlink
            paths |= {(k, max(ups, key=speed))} if ups else set()
            paths |= {(max(downs, key=speed), k)} if downs else set()
        return sorted(paths)

    def directed_links(self, unlimited_rate: bool = False, ideal: bool = False) -> dict[tuple[int, int], LinkSpec]:
        """Every directed link (src, dst) -> its impairments (:meth:`link_between`): what netem shapes and the
        simulator models. ``unlimited_rate``: the same links with the rate limit lifted (the bound pass);
        ``ideal``: no shaping and no added delay (the ideal pass)."""
        n = self.world_size
        if ideal:
            return {(i, j): LinkSpec() for i in range(n) for j in range(n) if i != j}
        links = {(i, j): self.link_between(i, j) for i in range(n) for j in range(n) if i != j}
        if unlimited_rate:
            links = {k: v.model_copy(update={"rate_mbit": None}) for k, v in links.items()}
        return links


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-", "tagged-union")))
        msg = e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        shown = "" if isinstance(given, (dict, list)) or given is None or "got " in msg else f" (got {given!r:.60})"
        lines.append(f"{loc or '<top>'}: {msg}{shown}")
    return "\n".join(lines)


def parse_recorded(data: Any, source: str = "<recorded scenario>") -> Scenario:
    """A scenario as a results folder recorded it. Folders recorded before star access links, the congestion
    control setting and sharded latents ran every directed link on its own, under the host's algorithm, gathering
    the output every step: they read as such."""
    if isinstance(data, dict):
        data = {"topology": "mesh", "congestion_control": "host", "output_gather": "step"} | data
    return parse_scenario(data, source)


def parse_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    """Validate already-loaded YAML data."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario is a mapping of fields, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(f"{source}: invalid scenario\n{format_errors(e)}") from None
    except ValueError as e:  # raised by resolve_link outside pydantic's wrapping
        raise ScenarioError(f"{source}: {e}") from None


MAX_ALIASES = 50


class _Loader(yaml.SafeLoader):
    """Safe loader (no tags) that also bounds alias use, so no anchor/alias bomb reaches validation."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            self.aliases_seen = getattr(self, "aliases_seen", 0) + 1
            if self.aliases_seen > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name); a scenario needs far fewer")
        return super().compose_node(parent, index)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file (safe loader: no tags, size-limited)."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: no such scenario file")
    if path.stat().st_size > MAX_SCENARIO_BYTES:
        raise ScenarioError(f"{path}: larger than {MAX_SCENARIO_BYTES} bytes; not a scenario")
    try:
        text = path.read_text()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ScenarioError(f"{path}: not valid YAML{at}: {problem}") from None
    return parse_scenario(data, str(path))
