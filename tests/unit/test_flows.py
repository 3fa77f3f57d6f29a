"""Flow plumbing that needs no server: cache keys, retry classification, the deployment file."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
import yaml
from prefect.flows import Flow
from prefect.states import Completed, Failed

from argus.backends.base import BackendError
from argus.storage import fingerprint
from flows.deployments import FLOW_RESULTS_PATH, POOL_TYPES, base_job_template, pools_in
from flows.results import cache_key
from flows.runtime import artifact_key, transient

REPO = Path(__file__).resolve().parents[2]


def test_cache_keys_are_stable_and_input_sensitive() -> None:
    a = cache_key("sft", "quickstart", {"lr": 0.003, "epochs": 8}, {"sft": "abc"})
    assert a == cache_key("sft", "quickstart", {"epochs": 8, "lr": 0.003}, {"sft": "abc"})  # key order is irrelevant
    assert a != cache_key("sft", "quickstart", {"lr": 0.003, "epochs": 9}, {"sft": "abc"})
    assert a != cache_key("sft", "other-run", {"lr": 0.003, "epochs": 8}, {"sft": "abc"})
    assert a.startswith("argus-sft-")


def _failed(exc: BaseException) -> Any:
    return Failed(data=exc)


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"), True),
        (ConnectionError("refused"), True),
        (TimeoutError(), True),
        (BackendError("bad spec for this backend"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_transient_failures_are_retried(exc: BaseException, retry: bool) -> None:
    assert transient(None, None, _failed(exc)) is retry
    assert transient(None, None, Completed(data=1)) is False


def test_artifact_keys_are_what_prefect_accepts() -> None:
    assert artifact_key("Quickstart_Run", "sft progress") == "quickstart-run-sft-progress"


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    first = fingerprint(tmp_path / "m")
    assert first == fingerprint(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text('{"a": 1}')
    assert fingerprint(tmp_path / "m") != first
    with pytest.raises(FileNotFoundError):
        fingerprint(tmp_path / "missing")


def test_prefect_yaml_deploys_every_flow_to_both_pools() -> None:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert pools_in(REPO / "prefect.yaml") == sorted(POOL_TYPES)
    seen = set()
    for dep in doc["deployments"]:
        module, func = dep["entrypoint"].removesuffix(".py").replace("/", ".").split(":")
        flow = getattr(importlib.import_module(module.replace(".py", "")), func)
        assert isinstance(flow, Flow), dep["name"]
        seen.add((flow.name, dep["work_pool"]["name"]))
    assert {(f, p) for f in ("pipeline", "evaluate", "register") for p in POOL_TYPES} <= seen


def test_unknown_work_pool_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "prefect.yaml"
    bad.write_text(yaml.safe_dump({"deployments": [{"name": "x", "entrypoint": "a:b", "work_pool": {"name": "gpu"}}]}))
    with pytest.raises(ValueError, match="unknown work pool"):
        pools_in(bad)


def test_console_drops_tracebacks_of_expected_failures_only() -> None:
    import logging

    from argus.cli._common import _ExpectedFailures
    from flows.serving import PromotionError

    def record(exc: Exception) -> logging.LogRecord:
        with pytest.raises(type(exc)) as raised:
            raise exc
        info = (raised.type, raised.value, raised.tb)
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed", (), info)

    expected = record(PromotionError("v2 was not promoted: format rate 0.000 < 0.5"))
    assert _ExpectedFailures().filter(expected) and expected.exc_info is None
    assert "Traceback" not in logging.Formatter().format(expected)
    unexpected = record(KeyError("bug"))
    assert _ExpectedFailures().filter(unexpected) and unexpected.exc_info is not None
    assert "Traceback" in logging.Formatter().format(unexpected)


def test_kubernetes_pool_template_gives_flow_pods_the_stack_and_the_results_volume() -> None:
    # The shape of Prefect's default Kubernetes template (job_manifest → pod spec → one container).
    container = {"name": "prefect-job", "env": "{{ env }}", "image": "{{ image }}"}
    default = {"job_configuration": {"job_manifest": {"spec": {"template": {"spec": {"containers": [container]}}}}}}
    template = base_job_template("kubernetes", default)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["envFrom"] == [
        {"configMapRef": {"name": "argus-stack"}},
        {"secretRef": {"name": "argus-object-store"}},
    ]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "flow-results", "mountPath": FLOW_RESULTS_PATH}]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "argus-flow-results"}
    assert "envFrom" not in container, "the default template is not modified in place"
    assert base_job_template("process", default) is default
    # The flows keep their results where the pods mount the volume.
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    env = doc["definitions"]["kubernetes_pool"]["job_variables"]["env"]
    assert env["PREFECT_LOCAL_STORAGE_PATH"] == FLOW_RESULTS_PATH
    claims = [
        d["metadata"]["name"]
        for d in yaml.safe_load_all((REPO / "manifests/base/stack/prefect.yaml").read_text())
        if d["kind"] == "PersistentVolumeClaim"
    ]
    assert "argus-flow-results" in claims
