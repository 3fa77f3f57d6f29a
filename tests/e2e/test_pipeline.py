"""The quickstart pipeline end to end on the local backend (slow): real Prefect, MLflow, S3 endpoint,
gVisor sandbox, search proxy, torchrun + DeepSpeed, the vLLM CPU build and nginx.

The SFT job is killed after its first checkpoint; the pipeline fails and tears down its tool
environment; the same command then resumes: the data stage is skipped, training continues from the
checkpoint, and the run ends with a registered model version that beats the base model, served in
production behind the stable endpoint. Then, while a load generator sends chat completions through
that endpoint without pause: a version the gate refuses changes nothing; v2 replaces v1 (blue-green)
with no failed request; a v3 whose server cannot start never reaches production; a rollback returns
to v1, again with no failed request.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

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
    # The first 10 of the 60 eval tasks keep the test shorter; training is exactly the quickstart's.
    spec["eval"]["suites"][0]["limit"] = 10
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


class Load:
    """Chat completions through the stable endpoint from a few clients, without pause."""

    def __init__(self, url: str, model: str, clients: int = 3):
        self.url = url
        self.model = model
        self.stop = threading.Event()
        self.results: list[tuple[int, str]] = []  # (HTTP status, or -1 for a transport error; deployment)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/chat/completions", json=body)
                    ok = r.status_code == 200 and bool(r.json().get("choices"))
                    self.results.append((200 if ok else -r.status_code, r.headers.get("x-argus-deployment", "")))
                except httpx.HTTPError as exc:
                    self.results.append((-1, repr(exc)))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        time.sleep(2)
        return self

    def __exit__(self, *exc: Any) -> None:
        time.sleep(2)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    @property
    def failed(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200]

    def served_by(self) -> list[str]:
        order: list[str] = []
        for _status, dep in self.results:
            if not order or order[-1] != dep:
                order.append(dep)
        return order


def test_bad_spec_fails_before_anything_starts(cli: Cli, stack_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "examples" / "quickstart.yaml").read_text().replace("epochs: 8", "epochs: -1"))
    result = cli("run", str(bad), check=False)
    assert result.returncode == 1
    assert f"{bad}:" in result.stderr and "sft.epochs" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (Path(stack_env["ARGUS_HOME"]) / "stack").exists()  # no stack was started


@pytest.mark.timeout(1800)
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
        deadline = time.monotonic() + 900
        while '"event": "checkpoint"' not in (train_log.read_text() if train_log.exists() else ""):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 15 minutes"
            time.sleep(2)
        torchrun = [p for p in _ours(home, "torch.distributed.run") if "e2e-sft" in " ".join(p.cmdline())]
        assert torchrun, "the SFT job's torchrun was not found"
        for proc in torchrun:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        out, err = first.communicate(timeout=300)
        assert first.returncode == 1, out + err
        assert "SFT job e2e-sft Failed" in err and "resume" in err
        # The failed stage tore down what the run had started: no sandbox, search proxy or trainer left.
        assert not _ours(home, "sandbox serve", "search serve", "trainers.sft"), "processes left behind"

        second = cli("run", str(spec), "--run-name", "e2e", timeout=1200)
        out = second.stdout
        print(out)
        assert "prepare-data" in out and "skipped (took" in out
        assert '"event": "resumed"' in train_log.read_text()

        settings = StackSettings(home=Path(home))
        from argus.stack import effective_settings

        settings = effective_settings(settings)
        import mlflow

        client = mlflow.MlflowClient(settings.mlflow_url, registry_uri=settings.mlflow_url)
        version = client.get_model_version_by_alias("argus-quickstart", "candidate")
        tags = version.tags
        assert version.source.startswith(f"s3://{settings.bucket_models}/quickstart/e2e/sft-")
        assert "production" in version.aliases  # the quickstart asks for promotion
        assert "serving argus-quickstart" in out and "in production at" in out
        for key in (
            "argus.data.sft",
            "argus.data.eval",
            "argus.data.manifest",
            "argus.sft.mlflow_run_id",
            "argus.prefect.flow_run_id",
            "argus.pipeline.flow_run_id",
            "argus.code_version",
        ):
            assert tags.get(key), key
        assert version.run_id == tags["argus.sft.mlflow_run_id"]
        sft_acc = float(tags["eval.sft.overall.accuracy"])
        base_acc = float(tags["eval.base.overall.accuracy"])
        assert sft_acc > base_acc, (sft_acc, base_acc)
        assert float(tags["eval.sft.overall.format_rate"]) >= 0.5
        # The SFT run carries the training metrics and links back to the Prefect flow run.
        run = client.get_run(tags["argus.sft.mlflow_run_id"])
        assert "train/loss" in run.data.metrics or "loss" in run.data.metrics
        assert run.data.tags.get("argus.prefect.flow_run_id")

        runs = cli("runs", "list").stdout
        assert "e2e" in runs and "Completed" in runs and "Failed" in runs
        shown = cli("runs", "show", "e2e").stdout
        assert "registered argus-quickstart version" in shown

        _serving_scenarios(cli, settings, spec, tmp_path)
    finally:
        cli("stack", "down", check=False)


def _serving_scenarios(cli: Cli, settings: StackSettings, spec: Path, tmp_path: Path) -> None:
    from argus import registry
    from argus.storage import upload_dir

    name = "argus-quickstart"
    v1 = registry.version_by_alias(settings, name, "production")
    stable = v1.tags["argus.production.endpoint"]
    # The done-when of serving: the stable endpoint answers an OpenAI chat completion.
    answer = httpx.post(
        f"{stable}/chat/completions",
        json={"model": name, "messages": [{"role": "user", "content": "What is 2 * 3?"}], "max_tokens": 32},
        timeout=60,
    )
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None

    # v2: the untrained base model; v3: weights that are not a safetensors file.
    lineage = {k: v1.tags[k] for k in (registry.TAG_SPEC_URI, registry.TAG_DATA_ROOT)}
    versions = {}
    for label in ("v2", "v3"):
        local = tmp_path / label
        from argus.models.tiny import init_tiny

        init_tiny("qwen2", str(local), seed=0)
        if label == "v3":
            (local / "model.safetensors").write_bytes(b"not a model" * 100)
        uri = f"s3://{settings.bucket_models}/e2e-serving/{label}"
        upload_dir(local, uri, settings)
        mv = registry.register_version(settings, name=name, source=uri, key=label, run_id=None, tags=lineage)
        versions[label] = str(mv.version)
    lenient = tmp_path / "lenient.yaml"
    doc = yaml.safe_load(spec.read_text())
    doc["eval"]["gate"] = {"metric": "accuracy", "tolerance": 1.0, "min_format_rate": 0.0}
    lenient.write_text(yaml.safe_dump(doc, sort_keys=False))

    def production() -> str:
        return str(registry.version_by_alias(settings, name, "production").version)

    # The quickstart's gate (accuracy within 0.02 of production, format rate >= 0.5) refuses v2.
    refused = cli("promote", name, "--version", versions["v2"], "--to", "production", check=False, timeout=900)
    assert refused.returncode == 1 and "not promoted" in refused.stderr, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr and production() == v1.version
    assert registry.get_version(settings, name, versions["v2"]).tags.get("argus.staging.overall.accuracy")

    # v2 under load (a gate that lets it pass): no failed request, answers move from v1 to v2.
    with Load(stable, name) as load:
        cli("promote", name, "--version", versions["v2"], "--to", "production", "--spec", str(lenient), timeout=900)
    print(f"v1 -> v2: {len(load.results)} requests, {len(load.failed)} failed, served by {load.served_by()}")
    assert load.results and not load.failed, load.failed[:5]
    v2_dep = registry.get_version(settings, name, versions["v2"]).tags["argus.production.deployment"].split(":")[-1]
    assert len(load.served_by()) == 2 and load.served_by()[-1] == v2_dep
    assert production() == versions["v2"]
    assert registry.version_by_alias(settings, name, "previous-production").version == v1.version

    # v3 cannot start: it never reaches production; the endpoint and the alias stay on v2.
    broken = cli(
        "promote", name, "--version", versions["v3"], "--to", "production", "--spec", str(lenient), check=False
    )
    assert broken.returncode == 1 and "did not become healthy" in broken.stderr, broken.stdout + broken.stderr
    assert production() == versions["v2"]
    assert httpx.get(f"{stable}/models", timeout=5).headers["x-argus-deployment"] == v2_dep

    # Rollback under load: back to v1 with no failed request.
    with Load(stable, name) as load:
        cli("rollback", name, timeout=900)
    print(f"rollback: {len(load.results)} requests, {len(load.failed)} failed, served by {load.served_by()}")
    assert load.results and not load.failed, load.failed[:5]
    assert production() == v1.version
    assert registry.version_by_alias(settings, name, "previous-production").version == versions["v2"]
    status = cli("serving", "status").stdout
    assert "healthy" in status and "production" in status
