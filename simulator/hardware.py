"""Hardware profiles of GPU clusters: devices and link classes, shipped as data with a source for every figure.

``profiles/devices.yaml``: per device its datasheet peak (dense bf16 tensor TFLOPS), HBM bandwidth, and a published
single-device time of a model that anchors its compute efficiency (:mod:`.gpu` fits it). ``profiles/links.yaml``:
per link class the bus bandwidth and latency as nccl-tests reports them (all-gather busbw at large messages, time of
a small message), for the GPU-to-GPU fabric inside a machine (NVLink, PCIe) and the NIC between machines.
``scenario profile`` writes files of the same form for the machine it runs on.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import yaml

PROFILES_DIR = Path(__file__).with_name("profiles")


@dataclass(frozen=True)
class Anchor:
    """A published single-device time of one generation."""

    model: str
    resolution: int               # width in pixels (and height, unless given)
    steps: int
    seconds: float
    source: str
    height: int | None = None
    frames: int = 1
    batch: int = 1                # sequences per step (2 with classifier-free guidance)
    outside: bool = True          # the time includes the text encoders and the VAE decode (simulator.stages)
    decode: bool = True           # ... the VAE decode among them (False: the pipeline returned its latents)


@dataclass(frozen=True)
class LayerPoint:
    """One measured DiT block (``scenario profile``): ``tokens`` queries and keys at ``hidden`` width."""

    tokens: int
    hidden: int
    heads: int
    seconds: float


@dataclass(frozen=True)
class DeviceSpec:
    """One device kind: its peaks (datasheet, or measured by ``scenario profile``) and what fits its compute
    efficiency: published single-device times (``anchors``), or measured blocks (``measured``, fitted to
    ``efficiency``). ``codec``: measured seconds per input byte of an encode or decode ("1bit/encode", ...)."""

    name: str
    peak_tflops: float            # dense bf16 tensor-core peak
    hbm_gbs: float                # memory bandwidth, GB/s
    memory_gib: float
    source: str
    sms: int = 0                  # streaming multiprocessors (0: no wave quantization modelled)
    anchors: tuple[Anchor, ...] = ()
    codec_source: str = ""        # where its codec timings come from (see gpu.codec_seconds)
    efficiency: float | None = None
    measured: tuple[LayerPoint, ...] = ()
    codec: tuple[tuple[str, float], ...] = ()
    act_bytes: int = 2            # bytes per activation element of its runs (2: bf16; measured CPUs: 4)


@dataclass(frozen=True)
class LinkClass:
    """A link class in nccl-tests terms: ``busbw_gbs`` is the bus bandwidth of a large all-gather (GB/s per GPU,
    one direction), ``latency_us`` the time of one small-message step, ``p2p_gbs`` what one send/recv pair reaches
    (sendrecv_perf; NCCL gives a peer few channels, so on NVLink it is below the collectives'; None: the busbw).
    ``scope``: ``intra`` (GPU to GPU inside a machine) or ``nic`` (a machine's network interface, shared by its
    GPUs)."""

    name: str
    scope: str
    busbw_gbs: float
    latency_us: float
    source: str
    transport: str = ""           # nvlink, pcie-p2p, pcie-shm, roce, ib, tcp
    p2p_gbs: float | None = None
    p2p_source: str = ""

    @property
    def pair_gbs(self) -> float:
        """GB/s of one send/recv pair."""
        return min(self.busbw_gbs, self.p2p_gbs or self.busbw_gbs)


def _load(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a profile file is a mapping of names to entries")
    return raw


def read_devices(path: Path) -> dict[str, DeviceSpec]:
    out = {}
    for name, v in _load(path).items():
        anchors = tuple(Anchor(**a) for a in v.pop("anchors", None) or ())
        measured = tuple(LayerPoint(**p) for p in v.pop("measured", None) or ())
        codec = tuple(sorted((v.pop("codec", None) or {}).items()))
        out[name] = DeviceSpec(name=name, anchors=anchors, measured=measured, codec=codec, **v)
    return out


def read_links(path: Path) -> dict[str, LinkClass]:
    out = {}
    for name, v in _load(path).items():
        if v.get("scope") not in ("intra", "nic"):
            raise ValueError(f"{path}: link class {name!r}: scope is intra or nic, got {v.get('scope')!r}")
        out[name] = LinkClass(name=name, **v)
    return out


def write_devices(devices: dict[str, DeviceSpec], path: Path) -> None:
    data = {}
    for name, d in devices.items():
        entry = {k: v for k, v in asdict(d).items() if k != "name"}
        entry["anchors"] = [asdict(a) for a in d.anchors]
        entry["measured"] = [asdict(p) for p in d.measured]
        entry["codec"] = dict(d.codec)
        data[name] = {k: v for k, v in entry.items() if v not in ((), [], {}, None, "")}
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=120))


def write_links(links: dict[str, LinkClass], path: Path) -> None:
    path.write_text(yaml.safe_dump({n: {k: v for k, v in asdict(x).items() if k != "name"} for n, x in links.items()},
                                   sort_keys=False, width=120))


@dataclass(frozen=True)
class Profiles:
    devices: dict[str, DeviceSpec] = field(default_factory=dict)
    links: dict[str, LinkClass] = field(default_factory=dict)

    def device(self, name: str) -> DeviceSpec:
        if name not in self.devices:
            raise KeyError(f"no device profile {name!r}; shipped: {', '.join(self.devices)}")
        return self.devices[name]

    def link(self, name: str, scope: str) -> LinkClass:
        known = [n for n, x in self.links.items() if x.scope == scope]
        if name not in self.links or self.links[name].scope != scope:
            what = "inside a machine (intra_node)" if scope == "intra" else "between machines (inter_node)"
            raise KeyError(f"no link class {name!r} {what}; shipped: {', '.join(known)}")
        return self.links[name]


PATH_VARIABLE = "COMPACTBED_PROFILE_PATH"


def shipped() -> Profiles:
    """The profiles shipped in ``simulator/profiles``, plus measured ones (``<name>.devices.yaml``,
    ``<name>.links.yaml``) beside them or in the folders of ``$COMPACTBED_PROFILE_PATH`` (colon-separated)."""
    return _profiles(os.environ.get(PATH_VARIABLE, ""))


@cache
def _profiles(path: str) -> Profiles:
    devices = read_devices(PROFILES_DIR / "devices.yaml")
    links = read_links(PROFILES_DIR / "links.yaml")
    for folder in [PROFILES_DIR, *(Path(p) for p in path.split(os.pathsep) if p)]:
        for extra in sorted(folder.glob("*.devices.yaml")):
            devices |= read_devices(extra)
        for extra in sorted(folder.glob("*.links.yaml")):
            links |= read_links(extra)
    return Profiles(devices, links)
