"""Typed description of a compressor and of how the residual codec uses it (read from scenarios)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CompressorKind = Literal["identity", "1bit", "2bit", "lowrank", "sparse"]
ResidualMode = Literal["ef", "no_ef", "naive"]


class CompressorSpec(BaseModel):
    """Which compressor and its parameters.

    - identity: send ``wire_dtype`` (fp16/bf16/fp32) as is.
    - 1bit / 2bit: sign (+ magnitude bit) with a rank-1 per-token x per-channel scale.
    - lowrank: rank-``rank`` factors by subspace iteration; ``int4`` quantizes the factors.
    - sparse: keep the ``keep`` largest |x| of every ``group`` consecutive channels (N:M).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: CompressorKind = "identity"
    wire_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    rank: int = Field(8, ge=1, le=1024)
    int4: bool = False
    power_iters: int = Field(2, ge=0, le=10)
    keep: int = Field(1, ge=1, le=15)
    group: int = Field(4, ge=2, le=16)

    @model_validator(mode="after")
    def _check(self) -> "CompressorSpec":
        if self.keep >= self.group:
            raise ValueError(f"sparse keep ({self.keep}) must be smaller than group ({self.group})")
        return self

    def label(self) -> str:
        if self.kind == "lowrank":
            return f"lowrank{self.rank}" + ("-int4" if self.int4 else "")
        if self.kind == "sparse":
            return f"sparse{self.keep}:{self.group}"
        if self.kind == "identity":
            return self.wire_dtype
        return self.kind


class CodecSpec(BaseModel):
    """A compressor plus the residual mode: ``ef`` (residual + error feedback, the method),
    ``no_ef`` (residual, sender base = true activation; ablation), ``naive`` (compress x itself; ablation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compressor: CompressorSpec = CompressorSpec()
    residual: ResidualMode = "ef"
