"""The MLflow vocabulary of Argus: every tag and alias name, links between MLflow and Prefect, and the
tracker a training job writes its run with.

Runs, model versions and the registry are searched by these names (`argus runs`, promotion, the cluster
CLI), so they live here once; a module that writes or reads a tag imports its name from here.
"""

from __future__ import annotations

from typing import Any

from argus.config import StackSettings, repo_root

# -- runs: what made them ------------------------------------------------------------------------------
TAG_PREFECT_FLOW_RUN_ID = "argus.prefect.flow_run_id"
TAG_PREFECT_FLOW_RUN_URL = "argus.prefect.flow_run_url"
TAG_SPEC_NAME = "argus.spec.name"
TAG_SPEC_FILE = "argus.spec.file"
TAG_JOB_NAME = "argus.job.name"
TAG_CODE_VERSION = "argus.code_version"
TAG_PIPELINE_RUN = "argus.pipeline.run"
TAG_PIPELINE_ROOT = "argus.pipeline.root"  # marks the pipeline's own MLflow run among its stages' runs
TAG_PIPELINE_FLOW_RUN_ID = "argus.pipeline.flow_run_id"
TAG_DATA_PREFIX = "argus.data."  # + a data hash name (sft, eval, rl, manifest, search_index)
TAG_PROMPT = "argus.prompt"  # deepeyesv2 | compact: the prompt a model is trained and evaluated with

# -- training runs -------------------------------------------------------------------------------------
TAG_STAGE = "argus.stage"
TAG_DATASET_URI = "argus.dataset.uri"
TAG_DATASET_SHA256 = "argus.dataset.sha256"
TAG_BASE_MODEL_URI = "argus.base_model.uri"
TAG_NODE_POOL = "argus.node_pool"
TAG_EXPORT_URI = "argus.export.uri"

# -- evaluation runs -----------------------------------------------------------------------------------
TAG_EVAL_BASELINE = "argus.eval.baseline"
TAG_EVAL_MODEL_FINGERPRINT = "argus.eval.model_fingerprint"

# -- traces: one per episode (an evaluation's tasks, a sample of RL rollouts) -------------------------
TRACE_TAG_TASK = "argus.task_id"
TRACE_TAG_FAMILY = "argus.family"
TRACE_TAG_ACCURACY = "argus.accuracy"  # "1" solved, "0" not (trace search compares strings)
TRACE_TAG_REWARD = "argus.reward"  # the DeepEyesV2 score, two decimals
TRACE_TAG_FINISH = "argus.finish"  # answer | max_turns | invalid_action | policy_error
TRACE_TAG_SOURCE = "argus.trace.source"  # eval | rl
TRACE_TAG_LABEL = "argus.trace.label"  # the evaluation's label (base, sft, rl), or `step-N` of an RL run
TRACE_TAG_MODEL = "argus.trace.model_uri"
TAG_TRACES_ERROR = "argus.traces.error"  # on an eval run whose traces could not be written, and why

# -- registered model versions -------------------------------------------------------------------------
TAG_REGISTER_KEY = "argus.register.key"
TAG_SPEC_URI = "argus.spec.uri"
TAG_DATA_ROOT = "argus.data.root"
TAG_SFT_RUN_ID = "argus.sft.mlflow_run_id"
TAG_RL_RUN_ID = "argus.rl.mlflow_run_id"
TAG_RL_START_MODEL = "argus.rl.start_model"  # the SFT export an RL run started from
TAG_PRODUCTION_REJECTED = "argus.production.rejected"

# -- experiments ---------------------------------------------------------------------------------------
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow's UI opens it as model training, not as a GenAI app
TAG_NOTE = "mlflow.note.content"  # the description MLflow's UI shows (experiments, runs)

ALIAS_CANDIDATE = "candidate"
ALIAS_STAGING = "staging"
ALIAS_PRODUCTION = "production"
ALIAS_PREVIOUS = "previous-production"


def eval_run_tag(label: str) -> str:
    """The MLflow run of an evaluation (`base`, `sft`), on a model version."""
    return f"argus.eval.{label}.mlflow_run_id"


def eval_metric_tag(label: str, family: str, metric: str) -> str:
    return f"eval.{label}.{family}.{metric}"


def stage_tag(stage: str, key: str) -> str:
    """What a promotion stage (`staging`, `production`) recorded on a model version."""
    return f"argus.{stage}.{key}"


def ensure_experiment(name: str, description: str = "") -> str:
    """The experiment `name`, created as a model-training experiment (MLflow's UI opens experiments
    with traces in GenAI mode unless told otherwise) with `description`; made the active one, so that
    fluent calls (traces, `log_input`) land in it. Returns its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        tags = {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND, **({TAG_NOTE: description} if description else {})}
        try:
            experiment_id = client.create_experiment(name, tags=tags)
        except MlflowException:  # another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        if description and not experiment.tags.get(TAG_NOTE):
            client.set_experiment_tag(experiment_id, TAG_NOTE, description)
    mlflow.set_experiment(experiment_id=experiment_id)
    return str(experiment_id)


def experiment_description(spec_name: str) -> str:
    return (
        f"Argus pipeline `{spec_name}`: one parent run per pipeline run (stage timings, the per-task "
        "comparison), nested SFT, RL and evaluation runs. Every episode of an evaluation, and a sample of RL "
        "rollouts, is a trace: open the Traces tab, or a run's Traces tab, and search by `argus.task_id`, "
        "`argus.family`, `argus.accuracy`."
    )


def log_datasets(client: Any, run_id: str, datasets: dict[str, tuple[str, str, str]]) -> None:
    """Record datasets as the run's inputs (MLflow's Datasets section): name → (uri, content hash,
    context such as `training` or `evaluation`). Metadata only: the data stays where it is."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for name, (uri, digest, context) in datasets.items():
        with warnings.catch_warnings():  # a local path resolves two equal ways, and MLflow warns so
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        dataset = MetaDataset(source, name=name, digest=digest[:36])  # type: ignore[abstract]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def find_pipeline_run(client: Any, experiment_id: str, run_name: str) -> Any | None:
    """The pipeline's own MLflow run for `run_name` (not one of its stages' runs), if there is one."""
    found = client.search_runs(
        [experiment_id],
        f"tags.`{TAG_PIPELINE_RUN}` = '{run_name}' and tags.`{TAG_PIPELINE_ROOT}` = 'true'",
        max_results=1,
    )
    return found[0] if found else None


def code_version() -> str:
    """The commit this code came from (`ARGUS_CODE_VERSION` in images, git in a checkout)."""
    import os
    import subprocess

    from argus import __version__

    if os.environ.get("ARGUS_CODE_VERSION"):
        return os.environ["ARGUS_CODE_VERSION"]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=5)

    try:
        out = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return __version__
    if out.returncode != 0:
        return __version__
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def repository_url() -> str | None:
    """The checkout's `origin` remote (`ARGUS_REPOSITORY_URL` in images), if it has one."""
    import os
    import subprocess

    if os.environ.get("ARGUS_REPOSITORY_URL"):
        return os.environ["ARGUS_REPOSITORY_URL"]
    try:
        out = subprocess.run(
            ["git", "remote", "get-url", "origin"], cwd=repo_root(), capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# MLflow 3's UI keeps a global GenAI / model-training switch (GenAI unless the link says otherwise) and,
# with it on, ignores the experiment's kind: links to training objects ask for the training view.
UI_TRAINING_VIEW = "?workflowType=machine_learning"


def mlflow_run_url(settings: StackSettings, experiment_id: str, run_id: str) -> str:
    return f"{settings.mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}{UI_TRAINING_VIEW}"


def mlflow_traces_url(settings: StackSettings, experiment_id: str, run_id: str) -> str:
    """A run's traces in MLflow's UI (the run page's Traces tab)."""
    return f"{settings.mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}/traces{UI_TRAINING_VIEW}"


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

        # MLflow exports traces on 10 threads by default, and metrics and artifacts go out beside them:
        # with its default HTTP pool of 10 connections, urllib3 warned "Connection pool is full,
        # discarding connection" at every batch of RL trajectories. Set before MLflow's session exists.
        os.environ.setdefault("MLFLOW_HTTP_POOL_MAXSIZE", "32")
        import mlflow

        self.mlflow = mlflow
        self.experiment_id = ensure_experiment(experiment)
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

    @property
    def client(self) -> Any:
        return self.mlflow.MlflowClient()

    def log_params(self, params: dict[str, object]) -> None:
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step, synchronous=False)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.mlflow.log_text(text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.flush_async_logging()
        self.mlflow.end_run(status=status)
