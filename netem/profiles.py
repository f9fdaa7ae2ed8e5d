"""Link specifications: a link is a value with named, unit-suffixed parameters (Mininet's ``TCLink`` idea).

Named profiles ship as data in ``profiles.yaml`` beside this file, each with the source of its figures.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
MSS = 1448              # TCP payload per segment at MTU 1500 (1514 bytes on the wire)
MATHIS_C = 1.5 ** 0.5   # one loss-based TCP flow carries at most MATHIS_C * MSS / (RTT sqrt(p)) (Mathis et al. 1997)


class LinkSpec(BaseModel):
    """A link's impairments, each way: a node's access link to the hub, or one directed path.
    ``rate_mbit=None`` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_mbit: float | None = Field(None, gt=0, le=10_000_000, description="shaped rate, Mbit/s; null = unlimited")
    delay_ms: float = Field(0.0, ge=0, le=10_000, description="one-way delay, ms")
    jitter_ms: float = Field(0.0, ge=0, le=10_000, description="uniform +- jitter on the delay, ms")
    loss_pct: float = Field(0.0, ge=0, lt=100, description="independent per-packet loss, percent")
    queue_pkts: int = Field(1000, ge=10, le=1_000_000, description="queue limit, packets")

    @model_validator(mode="after")
    def _jitter_within_delay(self) -> "LinkSpec":
        if self.jitter_ms > self.delay_ms:
            raise ValueError(f"jitter {self.jitter_ms:g} ms exceeds the delay {self.delay_ms:g} ms: a packet cannot "
                             f"arrive before it was sent, so such a link is not uniform jitter (emulated, it stretches "
                             f"every round trip to several times the delay); keep jitter_ms <= delay_ms")
        return self

    @property
    def rate_bytes_per_s(self) -> float | None:
        return None if self.rate_mbit is None else self.rate_mbit * 1e6 / 8

    def then(self, other: "LinkSpec") -> "LinkSpec":
        """This link followed by ``other`` (a star's path: the sender's uplink, then the receiver's downlink):
        the slower rate, delays and jitters add, losses combine, the larger queue."""
        rates = [r for r in (self.rate_mbit, other.rate_mbit) if r is not None]
        return LinkSpec(rate_mbit=min(rates) if rates else None, delay_ms=self.delay_ms + other.delay_ms,
                        jitter_ms=self.jitter_ms + other.jitter_ms,
                        loss_pct=100 * (1 - (1 - self.loss_pct / 100) * (1 - other.loss_pct / 100)),
                        queue_pkts=max(self.queue_pkts, other.queue_pkts))

    def describe(self) -> str:
        rate = "unlimited" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        parts = [rate, f"{self.delay_ms:g} ms"]
        if self.jitter_ms:
            parts.append(f"+-{self.jitter_ms:g} ms")
        if self.loss_pct:
            parts.append(f"{self.loss_pct:.3g}% loss")
        return ", ".join(parts)


@cache
def named_profiles() -> dict[str, LinkSpec]:
    """The shipped profiles, validated."""
    raw = yaml.safe_load(PROFILES_FILE.read_text())
    return {name: LinkSpec(**(fields or {})) for name, fields in raw.items()}


def resolve_link(value: str | dict | LinkSpec) -> LinkSpec:
    """A profile name, a dict ``{profile: NAME, <overrides>}`` / plain fields, or a LinkSpec -> LinkSpec."""
    if isinstance(value, LinkSpec):
        return value
    profiles = named_profiles()
    if isinstance(value, str):
        value = {"profile": value}
    if not isinstance(value, dict):
        raise ValueError(f"a link is a profile name or a mapping, got {type(value).__name__}")
    fields = dict(value)
    name = fields.pop("profile", None)
    if name is not None:
        if name not in profiles:
            raise ValueError(f"unknown link profile {name!r}; known: {', '.join(sorted(profiles))}")
        fields = profiles[name].model_dump() | fields
    return LinkSpec(**fields)
