"""Progress events: what a training job tells whoever follows it, as one typed vocabulary.

A trainer prints each event as one `ARGUS {json}` line on stdout (`emit`); whatever follows the job reads
its log (a local torchrun log file, a PyTorchJob master pod's log) and turns lines back into events
(`parse`). The backends add the events only they see (a local restart, a PyTorchJob condition). The CLI
and the flows consume the same classes, so a field renamed here is renamed everywhere, and a line that
does not match a known event is ignored rather than half-understood.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PREFIX = "ARGUS "


def fmt_duration(seconds: float | None) -> str:
    """The one way Argus writes a duration (live views, tables, Prefect summaries): `3.2s` under ten
    seconds, `42s` under two minutes, `6m40s`, `1h02m03s`; empty when unknown."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    time: float = Field(default_factory=time.time)


class Start(_Event):
    """Rank 0 is about to take its first (or first resumed) optimizer step."""

    event: Literal["start"] = "start"
    step: int
    total: int
    mlflow_run_id: str
    examples: int | None = None


class Step(_Event):
    """One optimizer step done (rank 0); the metrics are the ones logged to MLflow for this step."""

    event: Literal["step"] = "step"
    step: int
    total: int
    loss: float
    lr: float | None = None
    grad_norm: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="further per-step figures (RL)")


class Checkpoint(_Event):
    event: Literal["checkpoint"] = "checkpoint"
    step: int
    uri: str
    seconds: float


class Resumed(_Event):
    event: Literal["resumed"] = "resumed"
    step: int
    checkpoint: str
    seconds: float


class Exported(_Event):
    event: Literal["exported"] = "exported"
    uri: str
    step: int


class Restarting(_Event):
    """The local backend restarts a failed torchrun (as a PyTorchJob restarts its pods)."""

    event: Literal["restarting"] = "restarting"
    exit_code: int
    restart: int


class Condition(_Event):
    """A PyTorchJob status condition the Kubernetes backend saw appear."""

    event: Literal["condition"] = "condition"
    type: str | None = None
    status: str | None = None
    reason: str | None = None
    message: str | None = None


Event = Annotated[Start | Step | Checkpoint | Resumed | Exported | Restarting | Condition, Field(discriminator="event")]
_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def line(event: Event) -> str:
    """The log line of an event (`ARGUS {"event": "step", ...}`, the layout people grep logs for)."""
    fields = event.model_dump(mode="json")
    return PREFIX + json.dumps({"event": fields.pop("event"), **fields})


def emit(event: Event) -> None:
    """Print the event for whoever follows this job (flushed: the follower reads the log live)."""
    print(line(event), flush=True)


def parse(text: str) -> Event | None:
    """The event on a log line (a prefix such as torchrun's `[rank0]:` is allowed), or None."""
    start = text.find(PREFIX + "{")
    if start < 0:
        return None
    try:
        return _ADAPTER.validate_json(text[start + len(PREFIX) :])
    except ValidationError:
        return None
