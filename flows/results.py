"""What the pipeline's stages return (persisted by Prefect, so a re-run can skip a finished stage)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field


def cache_key(stage: str, *parts: Any) -> str:
    """A stable key for a stage's inputs: the stage name plus a hash of everything it depends on."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return f"argus-{stage}-{hashlib.sha256(blob).hexdigest()[:24]}"


class DataRef(BaseModel):
    root: str | None = Field(None, description="generated data root (object store)")
    sft: str
    eval: str
    rl: str | None = None
    search: str = Field(description="prefix holding index.sqlite for the offline search backend")
    hashes: dict[str, str] = Field(description="content hashes of the inputs, recorded as lineage")
    generated: bool = False
    work_s: float = 0.0

    @property
    def data_root(self) -> str:
        """The prefix holding `eval/` and `search/` (the generated root, or where the spec's eval split is)."""
        return self.root or self.eval.rsplit("/eval/", 1)[0]


class SFTResult(BaseModel):
    """A training job's outcome (SFT's, and RL's as `RLResult`)."""

    job_name: str
    mlflow_run_id: str | None
    model_uri: str
    checkpoint_uri: str
    steps: int | None = None
    final_loss: float | None = None
    final_metrics: dict[str, float] = Field(default_factory=dict, description="the last step's further figures")
    restarts: int = 0
    resumed_from: str | None = None
    work_s: float = 0.0


RLResult = SFTResult  # the same record; the stage's name says which job it was


class EvalReport(BaseModel):
    label: str
    model_uri: str
    model_fingerprint: str
    suite: str
    metrics: dict[str, dict[str, Any]] = Field(description="per family and `overall`")
    slices: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per slice: accuracy, tool use, strategy rates (greedy and sampled)"
    )
    mlflow_run_id: str
    mlflow_run_url: str
    serve_s: float
    eval_s: float
    cached: bool = Field(False, description="these numbers were recorded by an earlier run")
    tasks: list[dict[str, Any]] = Field(
        default_factory=list, description="per task: gold, answer, reward, finish, tools, trace id"
    )

    def value(self, metric: str, family: str = "overall") -> float:
        return float(self.metrics[family][metric])


class RegisteredVersion(BaseModel):
    name: str
    version: str
    source: str
    aliases: list[str]
    url: str


class PromotionResult(BaseModel):
    name: str
    version: str
    to: str
    deployment: str
    endpoint_url: str
    metrics: dict[str, float]
    previous_version: str | None = None
    switch_s: float | None = None


class StageTiming(BaseModel):
    stage: str
    wall_s: float
    work_s: float = Field(0.0, description="time inside the stage's program: data generation, training, serving+eval")
    cached: bool = False
    ended_s: float | None = Field(
        None, description="when the stage ended, seconds after the pipeline started (stages may overlap)"
    )


def busy_s(stages: list[StageTiming]) -> float:
    """Seconds in which some stage's program was at work. A stage's work is placed at the end of its
    wall time (what precedes it is Prefect's and the backend's), and overlapping stages (the candidate's
    server starts while the model before it is evaluated) count once: `wall - busy` stays the
    orchestration's share."""
    ran = [s for s in stages if not s.cached]
    busy = sum(s.work_s for s in ran if s.ended_s is None)  # timings without their place (older results)
    reach = float("-inf")
    for start, end in sorted((s.ended_s - s.work_s, s.ended_s) for s in ran if s.ended_s is not None):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy


class PipelineResult(BaseModel):
    spec: str
    run_name: str
    flow_run_id: str
    flow_run_url: str
    mlflow_run_url: str
    data: DataRef
    sft: SFTResult
    rl: RLResult | None = None
    base_eval: EvalReport
    sft_eval: EvalReport
    rl_eval: EvalReport | None = None
    registered: RegisteredVersion
    serving: PromotionResult | None = None
    stages: list[StageTiming]
    wall_s: float

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.wall_s - busy_s(self.stages))

    @property
    def evaluations(self) -> dict[str, EvalReport]:
        return {"base": self.base_eval, "sft": self.sft_eval, **({"rl": self.rl_eval} if self.rl_eval else {})}

    def final_metrics(self) -> dict[str, float]:
        """What the pipeline's MLflow run records when it finishes."""
        final = {
            f"{label}/{family}/{metric}": report.value(metric, family)
            for label, report in self.evaluations.items()
            for family in report.metrics
            for metric in ("accuracy", "format_rate")
        }
        final["registered_version"] = float(self.registered.version)
        return final
