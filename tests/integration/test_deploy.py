"""`argus flows deploy` registers the flows as Prefect deployments; a run triggered through the Prefect API
is executed by the stack's worker exactly as `argus run` executes flows."""

from __future__ import annotations

import pytest

from argus.config import StackSettings
from argus.storage import write_uri
from tests.conftest import Cli

pytestmark = pytest.mark.integration


def test_deploy_then_trigger_register_through_the_worker(
    cli: Cli, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        cli("stack", "up")
        out = cli("flows", "deploy", timeout=400).stdout
        for name in ("pipeline/pipeline-local", "pipeline/pipeline-kubernetes", "evaluate/evaluate-local"):
            assert name in out, out
        assert "work pool argus-kubernetes: created" in out and "work pool argus-local" in out

        from argus.stack import effective_settings, flow_env

        for key, value in stack_env.items():
            if key.startswith("ARGUS_"):
                monkeypatch.setenv(key, value)
        stack = effective_settings(StackSettings())
        for key, value in {**stack.client_env(), **flow_env(stack)}.items():
            monkeypatch.setenv(key, value)
        model_uri = f"s3://{stack.bucket_models}/deploy-test/model"
        write_uri(f"{model_uri}/config.json", b"{}", stack)

        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # Prefect reads its settings once per process; an earlier test may have imported it already.
        with temporary_settings(updates={PREFECT_API_URL: stack.prefect_url}):
            flow_run = run_deployment(
                "register/register-local",
                parameters={"model_uri": model_uri, "name": "deploy-test", "tags": {"origin": "api"}},
                timeout=300,
            )
        assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state

        import mlflow

        client = mlflow.MlflowClient(stack.mlflow_url, registry_uri=stack.mlflow_url)
        version = client.get_model_version_by_alias("deploy-test", "candidate")
        assert version.source == model_uri
        assert version.tags["origin"] == "api"
        assert version.tags["argus.prefect.flow_run_id"] == str(flow_run.id)
    finally:
        cli("stack", "down", check=False)
