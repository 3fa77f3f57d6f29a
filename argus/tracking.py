"""MLflow conventions shared by flows and trainers: tag names and links between MLflow and Prefect."""

from __future__ import annotations

from argus.config import StackSettings

TAG_PREFECT_FLOW_RUN_ID = "argus.prefect.flow_run_id"
TAG_PREFECT_FLOW_RUN_URL = "argus.prefect.flow_run_url"
TAG_SPEC_NAME = "argus.spec.name"
TAG_SPEC_FILE = "argus.spec.file"
TAG_JOB_NAME = "argus.job.name"


def code_version() -> str:
    """The commit this code came from (`ARGUS_CODE_VERSION` in images, git in a checkout)."""
    import os
    import subprocess
    from pathlib import Path

    from argus import __version__

    if os.environ.get("ARGUS_CODE_VERSION"):
        return os.environ["ARGUS_CODE_VERSION"]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=5
        )

    try:
        out = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return __version__
    if out.returncode != 0:
        return __version__
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def mlflow_run_url(settings: StackSettings, experiment_id: str, run_id: str) -> str:
    return f"{settings.mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}"


def prefect_flow_run_url(settings: StackSettings, flow_run_id: str) -> str:
    return f"{settings.prefect_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}"


class RunTracker:
    """One MLflow run for a training job, written by rank 0 only.

    Attaches to `MLFLOW_RUN_ID` when the orchestrating flow created the run, resumes the run a
    checkpoint names after a restart, or creates a run (nested under `ARGUS_MLFLOW_PARENT_RUN_ID`
    when that is set). Metrics go out asynchronously so logging never stalls a training step.
    """

    def __init__(self, experiment: str, run_name: str, *, tags: dict[str, str], resume_run_id: str | None = None):
        import os

        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(experiment)
        run_id = resume_run_id or os.environ.get("MLFLOW_RUN_ID")
        parent = os.environ.get("ARGUS_MLFLOW_PARENT_RUN_ID")
        if run_id:
            self.run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
            self.resumed = True
        else:
            all_tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
            self.run = mlflow.start_run(run_name=run_name, tags=all_tags, log_system_metrics=True)
            self.resumed = False
        mlflow.set_tags(tags)

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)

    def log_params(self, params: dict[str, object]) -> None:
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step, synchronous=False)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.flush_async_logging()
        self.mlflow.end_run(status=status)
