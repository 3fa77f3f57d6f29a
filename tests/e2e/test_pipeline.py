"""The quickstart pipeline end to end on the local backend (slow): real Prefect, MLflow, S3 endpoint,
gVisor sandbox, search proxy, torchrun + DeepSpeed, the vLLM CPU build and nginx.

The SFT job is killed after its first checkpoint; the pipeline fails and tears down its tool
environment; the same command then resumes: the data stage is skipped, training continues from the
checkpoint, and the run ends with a registered model version that beats the base model, served in
production behind the stable endpoint. (Promotion under load, the gate and rollback: test_serving.py.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from argus.config import StackSettings
from tests.conftest import REPO, Cli

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _quickstart(tmp_path: Path, **sft: object) -> Path:
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec["sft"].update(sft)
    # The quickstart's model and schedule, shorter: a third of its SFT steps (a model that has learned the
    # format and some of the tasks, test_learning.py measures how much) and two small RL steps. 10 eval
    # tasks keep the evaluation short. The learning curve and pass@k stay on, on fewer tasks: one
    # curve point at the last step, 2 samples of 3.
    spec["sft"]["max_steps"] = 400
    # A smaller suite: 300 gold trajectories (as test_learning.py), enough RL prompts for its 2 steps, and
    # the 10 eval tasks the evaluation plays.
    spec["data"]["generate"].update(sft_size=300, rl_size=16, eval_size=10)
    spec["rl"].update(max_steps=2, prompts_per_step=4, rollouts_per_prompt=4, micro_batch_size=4)
    spec["eval"]["suites"][0].update(limit=10, samples=2, sample_limit=3)
    spec["sft"]["curve"].update(every_steps=10_000, tasks=3)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _ours(home: str, *needles: str) -> list[psutil.Process]:
    """Live processes whose command line or environment ties them to this test's home."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if not any(n in cmd for n in needles):
                continue
            if home in cmd or any(home in v for v in proc.environ().values()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_bad_spec_fails_before_anything_starts(cli: Cli, stack_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (REPO / "examples" / "quickstart.yaml").read_text()
    bad.write_text(re.sub(r"max_steps: \d+", "max_steps: -1", text, count=1))  # the first is SFT's
    result = cli("run", str(bad), check=False)
    assert result.returncode == 1
    assert f"{bad}:" in result.stderr and "sft.max_steps" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (Path(stack_env["ARGUS_HOME"]) / "stack").exists()  # no stack was started


@pytest.mark.timeout(3600)
def test_quickstart_crash_resume_and_register(cli: Cli, stack_env: dict[str, str], tmp_path: Path) -> None:
    # backoff_limit 0: a killed job fails the stage instead of being restarted by the backend; an early
    # first checkpoint keeps the test short (checkpointing does not change what is trained).
    spec = _quickstart(tmp_path, backoff_limit=0, checkpoint={"every_steps": 10, "keep_last": 2})
    home = stack_env["ARGUS_HOME"]
    train_log = Path(home) / "runs" / "e2e-sft" / "train.log"
    try:
        first = subprocess.Popen(
            [sys.executable, "-m", "argus.cli", "run", str(spec), "--run-name", "e2e"],
            env=stack_env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 1800
        while '"event": "checkpoint"' not in (train_log.read_text() if train_log.exists() else ""):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 30 minutes"
            time.sleep(2)
        torchrun = [p for p in _ours(home, "torch.distributed.run") if "e2e-sft" in " ".join(p.cmdline())]
        assert torchrun, "the SFT job's torchrun was not found"
        for proc in torchrun:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        out, err = first.communicate(timeout=600)
        assert first.returncode == 1, out + err
        assert "SFT job e2e-sft Failed" in err and "resume" in err
        # The failed stage tore down what the run had started: no sandbox, search proxy or trainer left.
        assert not _ours(home, "sandbox serve", "search serve", "trainers.sft"), "processes left behind"

        second = cli("run", str(spec), "--run-name", "e2e", timeout=2700)
        out = second.stdout
        print(out)
        assert "prepare-data" in out and "skipped (done earlier)" in out
        assert '"event": "resumed"' in train_log.read_text()

        name = "argus-quickstart"
        settings = StackSettings(home=Path(home))
        from argus.stack import effective_settings

        settings = effective_settings(settings)
        import mlflow

        client = mlflow.MlflowClient(settings.mlflow_url, registry_uri=settings.mlflow_url)
        version = client.get_model_version_by_alias(name, "candidate")
        tags = version.tags
        # The candidate is the RL model (the quickstart runs RL), with lineage to both training runs.
        assert version.source.startswith(f"s3://{settings.bucket_models}/quickstart/e2e/rl-")
        assert "production" in version.aliases  # the quickstart asks for promotion
        assert "serving argus-quickstart" in out and "in production at" in out
        for key in (
            "argus.data.sft",
            "argus.data.eval",
            "argus.data.manifest",
            "argus.sft.mlflow_run_id",
            "argus.rl.mlflow_run_id",
            "argus.rl.start_model",
            "argus.eval.rl.mlflow_run_id",
            "argus.prefect.flow_run_id",
            "argus.pipeline.flow_run_id",
            "argus.code_version",
        ):
            assert tags.get(key), key
        assert version.run_id == tags["argus.rl.mlflow_run_id"]
        assert tags["argus.rl.start_model"].startswith(f"s3://{settings.bucket_models}/quickstart/e2e/sft-")
        rl_run = client.get_run(tags["argus.rl.mlflow_run_id"])
        assert rl_run.data.tags["argus.sft.mlflow_run_id"] == tags["argus.sft.mlflow_run_id"]
        for key in ("reward/overall/mean", "rollout/tool_error_rate", "rollout/dropped_groups", "time/generate_s"):
            assert key in rl_run.data.metrics, key
        # Eval figures are metrics (on the eval runs and the pipeline run), not tags of the version.
        assert not any(k.startswith("eval.") for k in tags)
        from argus import tracking

        experiment = client.get_experiment_by_name("quickstart")
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        pipeline = tracking.find_pipeline_run(client, experiment.experiment_id, "e2e")
        metrics = pipeline.data.metrics
        sft_acc, base_acc = metrics["sft/overall/accuracy"], metrics["base/overall/accuracy"]
        assert sft_acc > base_acc, (sft_acc, base_acc)
        assert metrics["sft/overall/format_rate"] >= 0.5
        for stage in ("prepare-data", "tool-environment", "sft", "rl", "deploy-rl", "evaluate-rl", "register"):
            assert f"stage/{stage}/wall_s" in metrics, stage
        assert {d.dataset.name for d in pipeline.inputs.dataset_inputs} >= {"sft", "eval"}
        # The per-task comparison is a table artifact of the pipeline run, one row per eval task.
        import json

        table = json.loads(
            Path(client.download_artifacts(pipeline.info.run_id, "comparison/per_task.json", str(tmp_path))).read_text()
        )  # MLflow's table format: columns, and one row of values per task
        assert len(table["data"]) == 10 and {"gold", "base answer", "sft reward", "rl correct"} <= set(table["columns"])
        # One trace per evaluated task, on its eval run, with the model's turns and its tool calls.
        eval_run = client.get_run(tags["argus.eval.sft.mlflow_run_id"])
        assert eval_run.data.params["model_uri"] and eval_run.data.params["suite"] == "mini"
        assert eval_run.info.end_time - eval_run.info.start_time > 5000  # it spans the evaluation
        traces = client.search_traces(locations=[experiment.experiment_id], run_id=eval_run.info.run_id)
        assert len(traces) == 10
        assert all(any(s.span_type == "CHAT_MODEL" for s in t.data.spans) for t in traces)
        # The version's description is its lineage card: data hashes, the runs, the full commit, the evals.
        card = version.description
        assert "**Data**" in card and tags["argus.data.sft"][:16] in card and "| overall |" in card
        assert tags["argus.sft.mlflow_run_id"][:12] in card and len(tags["argus.code_version"].split("-")[0]) == 40
        assert tags["argus.prefect.flow_run_id"] == tags["argus.pipeline.flow_run_id"]
        # The SFT run carries the training metrics and links back to the Prefect flow run.
        run = client.get_run(tags["argus.sft.mlflow_run_id"])
        assert "train/loss" in run.data.metrics or "loss" in run.data.metrics
        # Its learning curve: held-out accuracy and format rate by family, logged while it trained.
        assert {"curve/overall/accuracy", "curve/overall/format_rate"} <= set(run.data.metrics)
        # Sampled evaluation of the trained models (not of the base): pass@1 and pass@k at temperature 1.
        assert {"overall/pass_at_1", "overall/pass_at_2"} <= set(eval_run.data.metrics), eval_run.data.metrics
        assert run.data.tags.get("argus.prefect.flow_run_id")

        runs = cli("runs", "list").stdout
        assert "e2e" in runs and "Completed" in runs and "Failed" in runs
        shown = cli("runs", "show", "e2e").stdout
        assert "registered argus-quickstart version" in shown

        # The done-when of serving: the quickstart's model answers a chat completion at the stable endpoint.
        stable = version.tags["argus.production.endpoint"]
        answer = httpx.post(
            f"{stable}/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "What is 2 * 3?"}], "max_tokens": 32},
            timeout=120,
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
        assert answer.headers["x-argus-model-version"] == f"{name}/{version.version}"
        status = cli("serving", "status").stdout
        assert "healthy" in status and "production" in status and f"v{version.version}" in status
    finally:
        cli("stack", "down", check=False)
