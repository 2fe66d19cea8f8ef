"""The latency service's request bodies: every field typed and bounded (pydantic, strict).

Strict types: "12" is not a number and 1.0 is not an integer; unknown fields are mistakes.
Latencies are finite and positive; names and labels have no control characters.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .measurement import DEVICE_NAME

DeviceName = Annotated[str, StringConstraints(pattern=DEVICE_NAME.pattern)]
Label = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
LeaseId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Latency = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # ms: finite and positive
Scalar = str | int | Annotated[float, Field(allow_inf_nan=False)] | bool | None


class Body(BaseModel):
    # strict: "12" is not a number and 1.0 is not an integer; unknown fields are mistakes
    model_config = ConfigDict(extra="forbid", strict=True)


class DeviceIn(Body):
    name: DeviceName
    kind: Annotated[Label, StringConstraints(min_length=1, max_length=64)] = Field(
        description="what the device is, e.g. iphone-14-pro or xeon-2core"
    )
    backend: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")] = Field(
        description="a profiling backend: torch or coreml"
    )
    compute_unit: str | None = Field(
        None, description="torch: cpu|cuda|mps; coreml: ALL|CPU_ONLY|CPU_AND_GPU|CPU_AND_NE"
    )
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    notes: Annotated[str, StringConstraints(max_length=2000)] = ""


class JobsIn(Body):
    space: str | None = Field(None, description="a search space the server knows, e.g. tiny")
    signatures: list[dict[str, Any]] | None = Field(
        None, max_length=10_000, description="block signatures, as in a table export"
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> JobsIn:
        if (self.space is None) == (self.signatures is None):
            raise ValueError("give either 'space' or 'signatures'")
        return self


class LeaseIn(Body):
    agent: Label = "agent"
    device: DeviceName | None = Field(None, description="required with the admin token")


class LeaseRef(Body):
    lease_id: LeaseId


class FailIn(Body):
    lease_id: LeaseId
    error: Annotated[str, StringConstraints(min_length=1, max_length=20_000)]


class ResultIn(Body):
    lease_id: LeaseId = Field(description="the lease the job is held under (from /jobs/lease)")
    samples_ms: list[Latency] = Field(min_length=1, max_length=100_000)
    versions: dict[Annotated[str, StringConstraints(max_length=100)], Scalar] = Field(
        default_factory=dict, max_length=64
    )


class PredictIn(Body):
    space: str
    device: DeviceName
    architecture: dict[str, Any] | None = Field(None, description="default: the original")
    backend: str | None = None
    compute_unit: str | None = None
    precision: str | None = None
    calibrate: bool = True


class TokenIn(Body):
    role: Literal["agent", "reader"]
    device: DeviceName | None = None
    label: Label = ""
