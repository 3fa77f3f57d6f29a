"""Serving and promotion end to end on the local backend (slow): real vLLM CPU servers behind nginx,
the registry on the real MLflow server, staging evaluations with the gVisor sandbox and search proxy.

Three registered versions of a tiny model: v1 and v2 differ in their weights, v3's weights are not a
safetensors file. v1 goes to production. The spec's gate refuses v2 and changes nothing. Then, while a
load generator sends chat completions through the stable endpoint without pause: v2 replaces v1
(blue-green) with no failed request; v3 never reaches production; a rollback returns to v1, again with
no failed request. Needs no trained model, so it runs beside the pipeline test rather than after it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from argus.config import StackSettings
from tests.conftest import REPO, Cli

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NAME = "argus-e2e-serving"


class Load:
    """Chat completions through the stable endpoint from a few clients, each sending its next request as
    soon as the last one is answered."""

    def __init__(self, url: str, model: str, clients: int = 3):
        self.url = url
        self.model = model
        self.stop = threading.Event()
        # Per client, in order: (200, or -status / -1 for a transport error; the deployment that answered;
        # when the request was sent).
        self.results: list[list[tuple[int, str, float]]] = [[] for _ in range(clients)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, client_no: int) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        out = self.results[client_no]
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post(f"{self.url}/chat/completions", json=body)
                    ok = r.status_code == 200 and bool(r.json().get("choices"))
                    out.append((200 if ok else -r.status_code, r.headers.get("x-argus-deployment", ""), sent))
                except httpx.HTTPError as exc:
                    out.append((-1, repr(exc), sent))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        time.sleep(2)
        return self

    def __exit__(self, *exc: Any) -> None:
        time.sleep(2)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)

    @property
    def sent(self) -> int:
        return sum(len(r) for r in self.results)

    @property
    def failed(self) -> list[tuple[int, str, float]]:
        return [r for client in self.results for r in client if r[0] != 200]

    def served_by(self) -> list[list[str]]:
        """Per client, the deployments that answered, in order, repeats collapsed. While nginx reloads,
        its old and new workers both accept connections for a moment, so a client can see old, new, old,
        new; once the switch has returned, only the new one answers."""
        out = []
        for client in self.results:
            order: list[str] = []
            for _status, dep, _sent in client:
                if not order or order[-1] != dep:
                    order.append(dep)
            out.append(order)
        return out

    def deployments_since(self, t: float) -> set[str]:
        return {dep for client in self.results for _status, dep, sent in client if sent >= t}


def _specs(tmp_path: Path) -> tuple[Path, Path]:
    """The quickstart spec with a short staging evaluation: as it is (its gate wants a format rate of
    0.5, which an untrained model never reaches) and with a gate that lets any version through."""
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["model"]["registered_name"] = NAME
    doc["eval"]["suites"][0].update(limit=3, max_turns=2)
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(doc, sort_keys=False))
    doc["eval"]["gate"] = {"metric": "accuracy", "tolerance": 1.0, "min_format_rate": 0.0}
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(yaml.safe_dump(doc, sort_keys=False))
    return strict, lenient


def _register(settings: StackSettings, tmp_path: Path, strict: Path) -> dict[str, str]:
    from argus import registry, tracking
    from argus.data.generate import generate
    from argus.models.tiny import init_tiny
    from argus.storage import upload_dir
    from tests.conftest import local_tools

    data_root = f"s3://{settings.bucket_data}/e2e-serving/suite"
    generate(data_root, tools=local_tools(settings), seed=5, sft_size=4, rl_size=2, eval_size=4, stack=settings)
    lineage = {tracking.TAG_SPEC_URI: str(strict), tracking.TAG_DATA_ROOT: data_root}
    versions = {}
    for label, seed in (("v1", 0), ("v2", 1), ("v3", 0)):
        local = tmp_path / label
        init_tiny("qwen2", str(local), seed=seed)
        if label == "v3":
            (local / "model.safetensors").write_bytes(b"not a model" * 100)
        uri = f"s3://{settings.bucket_models}/e2e-serving/{label}"
        upload_dir(local, uri, settings)
        mv = registry.register_version(settings, name=NAME, source=uri, key=label, run_id=None, tags=lineage)
        versions[label] = str(mv.version)
    return versions


@pytest.mark.timeout(2700)
def test_gated_blue_green_promotion_and_rollback(cli: Cli, stack_env: dict[str, str], tmp_path: Path) -> None:
    from argus import registry
    from argus.stack import effective_settings

    strict, lenient = _specs(tmp_path)
    try:
        cli("stack", "up", timeout=600)
        settings = effective_settings(StackSettings(home=Path(stack_env["ARGUS_HOME"])))
        versions = _register(settings, tmp_path, strict)

        def production() -> str:
            return str(registry.version_by_alias(settings, NAME, "production").version)

        def deployment(label: str) -> str:
            tag = registry.get_version(settings, NAME, versions[label]).tags["argus.production.deployment"]
            return str(tag.split(":")[-1])

        # v1: staging (deploy, health, evaluation with live tools), gate, first production switch.
        first = cli(
            "promote", NAME, "--version", versions["v1"], "--to", "production", "--spec", str(lenient), timeout=1200
        )
        print(first.stdout)
        assert production() == versions["v1"]
        v1 = registry.get_version(settings, NAME, versions["v1"])
        for key in (
            "argus.staging.overall.accuracy",
            "argus.staging.deployed_at",
            "argus.staging.flow_run_id",
            "argus.production.deployed_at",
            "argus.production.flow_run_id",
            "argus.production.endpoint",
        ):
            assert v1.tags.get(key), key  # fmt: skip
        stable = v1.tags["argus.production.endpoint"]
        answer = httpx.post(
            f"{stable}/chat/completions",
            json={"model": NAME, "messages": [{"role": "user", "content": "What is 2 * 3?"}], "max_tokens": 8},
            timeout=120,
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
        # Promoting the version production serves already (a pipeline run re-run to its end) succeeds
        # without a switch: the same deployment behind the stable endpoint, no previous version.
        serving = httpx.get(f"{stable}/models", timeout=10).headers["x-argus-deployment"]
        again = cli(
            "promote", NAME, "--version", versions["v1"], "--to", "production", "--spec", str(lenient), timeout=1200
        )
        assert "switch 0.0s" in again.stdout and "previous" not in again.stdout, again.stdout + again.stderr
        assert production() == versions["v1"] and deployment("v1") == serving
        assert httpx.get(f"{stable}/models", timeout=10).headers["x-argus-deployment"] == serving

        # The spec's own gate (format rate >= 0.5) refuses v2: production and its alias stay on v1.
        refused = cli("promote", NAME, "--version", versions["v2"], "--to", "production", check=False, timeout=1200)
        assert refused.returncode == 1 and "not promoted" in refused.stderr, refused.stdout + refused.stderr
        assert "format rate" in refused.stderr and "Traceback" not in refused.stderr
        assert production() == versions["v1"]
        assert registry.get_version(settings, NAME, versions["v2"]).tags.get("argus.staging.overall.format_rate")

        # v2 under load, with a gate that lets it through: no failed request, answers move from v1 to v2.
        with Load(stable, NAME) as load:
            switched = cli(
                "promote", NAME, "--version", versions["v2"], "--to", "production", "--spec", str(lenient), timeout=1200
            )
            done = time.monotonic()
        print(switched.stdout)
        print(f"v1 -> v2: {load.sent} requests, {len(load.failed)} failed, served by {load.served_by()}")
        assert load.sent and not load.failed, load.failed[:5]
        assert all(order[0] == deployment("v1") and order[-1] == deployment("v2") for order in load.served_by())
        assert load.deployments_since(done) == {deployment("v2")}
        assert production() == versions["v2"]
        assert registry.version_by_alias(settings, NAME, "previous-production").version == versions["v1"]

        # v3 cannot start: it never reaches production; the endpoint and the aliases stay as they were.
        broken = cli(
            "promote", NAME, "--version", versions["v3"], "--to", "production", "--spec", str(lenient), check=False,
            timeout=1200,
        )  # fmt: skip
        assert broken.returncode == 1 and "did not become healthy" in broken.stderr, broken.stdout + broken.stderr
        assert production() == versions["v2"]
        assert registry.version_by_alias(settings, NAME, "previous-production").version == versions["v1"]
        assert httpx.get(f"{stable}/models", timeout=10).headers["x-argus-deployment"] == deployment("v2")

        # Rollback under load: back to v1 with no failed request.
        with Load(stable, NAME) as load:
            back = cli("rollback", NAME, timeout=1200)
            done = time.monotonic()
        print(back.stdout)
        print(f"rollback: {load.sent} requests, {len(load.failed)} failed, served by {load.served_by()}")
        assert load.sent and not load.failed, load.failed[:5]
        assert all(order[0] == deployment("v2") and order[-1] == deployment("v1") for order in load.served_by())
        assert load.deployments_since(done) == {deployment("v1")}
        assert production() == versions["v1"]
        assert registry.version_by_alias(settings, NAME, "previous-production").version == versions["v2"]
        status = cli("serving", "status").stdout
        print(status)
        assert "healthy" in status and "production" in status and f"v{versions['v1']}" in status
    finally:
        cli("stack", "down", check=False, timeout=300)
