"""Pipeline spec validation: every error names the file, the line and the field path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from argus.cli import app
from argus.config import PipelineSpec, SandboxSettings, StackSettings, kernel_profiles, repo_root
from argus.specfile import SpecError, load_spec, parse_spec
from tests.conftest import REPO

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def quickstart() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())


def cluster() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "deepeyesv2-7b.yaml").read_text())


def set_path(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


class _Delete:
    """The field is removed instead of set. Its repr is stable: test ids are the same in every process."""

    def __repr__(self) -> str:
        return "<deleted>"


DELETE = _Delete()

# (base document, field to set, value, expected error path, text the message must contain)
BAD_SPECS = [
    (quickstart, "sft.deepspeed.zero_stag", 2, "sft.deepspeed.zero_stag", "did you mean 'zero_stage'"),
    (quickstart, "trainer", {"x": 1}, "trainer", "unknown key"),
    (quickstart, "sft.nproc_per_node", "two", "sft.nproc_per_node", "integer"),
    (quickstart, "sft.optim.lr", -1, "sft.optim.lr", "greater than 0"),
    (quickstart, "backend", "slurm", "backend", "'local' or 'kubernetes'"),
    (quickstart, "version", 2, "version", "1"),
    (quickstart, "model", DELETE, "model", "required"),
    (quickstart, "model.registered_name", DELETE, "model.registered_name", "required"),
    (quickstart, "model.base", {"uri": "s3://argus-models/x", "init_tiny": "qwen2"}, "model.base", "exactly one"),
    (quickstart, "model.base.init_tiny", "llama", "model.base.init_tiny", "qwen2"),
    (quickstart, "name", "Quick_Start", "name", "pattern"),
    (quickstart, "eval.suites", [], "eval.suites", "at least 1"),
    (quickstart, "eval.suites", [{"name": "a"}, {"name": "a"}], "eval.suites", "duplicate suite names: a"),
    (quickstart, "eval.suites.0.max_turn", 3, "eval.suites[0].max_turn", "did you mean 'max_turns'"),
    (quickstart, "data.sft", "s3://argus-data/sft.json", "data", "exclusive"),
    (quickstart, "tools.sandbox.runner", "docker", "tools.sandbox.runner", "'gvisor' or 'process'"),
    (quickstart, "tools.sandbox.memory_mb", 8, "tools.sandbox.memory_mb", "greater than or equal to 64"),
    (quickstart, "tools.search", {"provider": "serpapi"}, "tools.search", "api_key_secret"),
    (quickstart, "sft.deepspeed.offload_params", True, "sft.deepspeed", "zero_stage 3"),
    (quickstart, "sft.resources", {"memory": "lots"}, "sft.resources.memory", "pattern"),
    (quickstart, "serving.promote_to", "prod", "serving.promote_to", "'production'"),
    (quickstart, "sft.enabled", False, "sft.enabled", "RL stage starts from the SFT model"),
    (quickstart, "rl.vllm.url", "http://127.0.0.1:8000", "rl.vllm.url", "did you mean 'urls'"),
    (quickstart, "rl.vllm.urls", ["127.0.0.1:8000"], "rl.vllm.urls", "not an http(s):// URL"),
    (quickstart, "rl.vllm.probe_tolerance", 0, "rl.vllm.probe_tolerance", "greater than 0"),
    (quickstart, "rl.filter_groups.max_batches", 0, "rl.filter_groups.max_batches", "greater than or equal to 1"),
    (quickstart, "rl.filter_groups.enable", True, "rl.filter_groups.enable", "did you mean 'enabled'"),
    (cluster, "data.sft", "s3://Bad_Bucket/x", "data.sft", "pattern"),
    (cluster, "sft.node_pool", "a100", "sft.node_pool", "unknown node pool 'a100'"),
    (cluster, "data.eval", "data/val.parquet", "data.eval", "local path, which pods cannot read"),
    (cluster, "model.base.uri", "/models/qwen", "model.base.uri", "use s3:// or hf://"),
    (cluster, "data", {"generate": {"seed": 1}}, "data.generate", "argus data generate --out s3://"),
    (cluster, "rl.node_pool", DELETE, "rl.node_pool", "needs a node pool"),
    (cluster, "sft.resources.gpus", 16, "sft.resources.gpus", "has 8 per node"),
    (cluster, "sft.nproc_per_node", 4, "sft.nproc_per_node", "one process per GPU"),
    (cluster, "rl.reward.format_weight", 0.5, "rl.reward", "must be 1.0"),
    (cluster, "rl.mini_batch_prompts", 48, "rl", "does not divide prompts_per_step 256"),
    (cluster, "tools.judge", DELETE, "rl.reward.judge", "tools.judge is not configured"),
    (cluster, "node_pools.h100-train.gpus_per_node", -1, "node_pools.h100-train.gpus_per_node", "greater than"),
    (
        cluster,
        "node_pools.h100-train.tolerations.0.effect",
        "Never",
        "node_pools.h100-train.tolerations[0].effect",
        "NoSchedule",
    ),
]


@pytest.mark.parametrize(
    ("base", "path", "value", "expected_path", "expected_text"),
    BAD_SPECS,
    ids=[f"{c[3]}={c[2]!r}"[:60] for c in BAD_SPECS],
)
def test_bad_spec_names_file_and_field(base, path, value, expected_path, expected_text):  # type: ignore[no-untyped-def]
    text = yaml.safe_dump(set_path(base(), path, value), sort_keys=False)
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.yaml")
    issues = info.value.issues
    assert all(i.file == "bad.yaml" for i in issues)
    matching = [i for i in issues if i.path == expected_path]
    assert matching, f"no error at {expected_path}: {[str(i) for i in issues]}"
    assert expected_text in matching[0].message, str(matching[0])
    assert matching[0].line is not None and matching[0].line >= 1


def test_a_spec_that_trains_nothing_is_refused():
    doc = set_path(set_path(quickstart(), "sft.enabled", False), "rl.enabled", False)
    with pytest.raises(SpecError, match=r"sft\.enabled: both sft and rl are disabled"):
        parse_spec(yaml.safe_dump(doc, sort_keys=False), "bad.yaml")


def test_error_points_at_the_line_of_the_typo():
    text = (EXAMPLES / "quickstart.yaml").read_text().replace("    zero_stage: 2", "    zero_stag: 2", 1)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "zero_stag:" in t)
    with pytest.raises(SpecError) as info:
        parse_spec(text, "examples/quickstart.yaml")
    (issue,) = info.value.issues
    assert str(issue) == (
        f"examples/quickstart.yaml:{line}: sft.deepspeed.zero_stag: unknown key (did you mean 'zero_stage'?)"
    )


def test_duplicate_keys_are_errors():
    text = (EXAMPLES / "quickstart.yaml").read_text() + "\nbackend: local\n"
    with pytest.raises(SpecError) as info:
        parse_spec(text, "dup.yaml")
    assert [(i.path, i.message) for i in info.value.issues] == [("backend", "duplicate key")]
    assert info.value.issues[0].line == len(text.splitlines())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "expected a mapping at the top level, got list"),
        ("name: [unclosed\n", "invalid YAML"),
        ("name: x\n  bad: indent\n", "invalid YAML"),
    ],
)
def test_unreadable_documents(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "f.yaml")
    assert message in str(info.value)


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the file"):
        load_spec(tmp_path / "nope.yaml")


def test_examples_are_valid() -> None:
    quick = load_spec(EXAMPLES / "quickstart.yaml")
    assert quick.backend == "local" and quick.model.base.init_tiny == "qwen2"
    assert quick.serving.promote_to == "production"
    big = load_spec(EXAMPLES / "deepeyesv2-7b.yaml")
    assert big.backend == "kubernetes"
    assert (big.sft.nodes, big.sft.nproc_per_node, big.sft.world_size) == (4, 8, 32)
    assert (big.rl.world_size, big.rl.rollouts_per_prompt, big.rl.max_turns) == (32, 16, 9)
    # DeepEyesV2's 256 prompts a step in mini-batches of 32: 8 updates, 16 episodes of each per rank.
    assert (big.rl.updates_per_step, big.rl.episodes_per_update(32)) == (8, 16)
    assert big.sft.deepspeed.zero_stage == 3 and big.sft.deepspeed.offload_optimizer
    assert big.node_pools["h100-train"].queue == "train-h100"


def test_spec_round_trips_through_json() -> None:
    spec = load_spec(EXAMPLES / "deepeyesv2-7b.yaml")
    assert PipelineSpec.model_validate_json(spec.model_dump_json()) == spec


def test_validate_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(EXAMPLES / "quickstart.yaml"), str(EXAMPLES / "deepeyesv2-7b.yaml")])
    assert ok.exit_code == 0, ok.output
    bad = tmp_path / "typo.yaml"
    bad.write_text((EXAMPLES / "quickstart.yaml").read_text().replace("max_seq_len:", "max_seqlen:"))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:" in result.output and "sft.max_seqlen: unknown key (did you mean 'max_seq_len'?)" in result.output


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["train", "sft", "--data", "sft.json", "--config"],
        ["train", "rl", "--model", "m", "--data", "rl.parquet", "--config"],
    ],
)
def test_a_run_name_that_cannot_name_a_job_is_refused_before_anything_starts(
    command: list[str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app, [*command, str(EXAMPLES / "quickstart.yaml"), "--run-name", "Try-A", "--home", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert "--run-name 'Try-A' must be a DNS label" in result.output
    assert not (tmp_path / "stack").exists()  # refused before the stack was started


def test_stack_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ARGUS_HOME", str(tmp_path))
    monkeypatch.setenv("ARGUS_MLFLOW_PORT", "5123")
    monkeypatch.setenv("ARGUS_S3_ENDPOINT", "http://minio.internal:9000/")
    settings = StackSettings()
    assert settings.home == tmp_path
    assert settings.mlflow_url == "http://127.0.0.1:5123"
    assert settings.s3_url == "http://minio.internal:9000"
    assert settings.client_env()["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.internal:9000"


def test_bad_stack_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARGUS_MLFLOW_PORT", "not-a-port")
    result = CliRunner().invoke(app, ["stack", "status"])
    assert result.exit_code == 2
    assert "ARGUS_MLFLOW_PORT" in result.output


def test_sandbox_profiles_choose_the_kernel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"default", "minimal"} <= set(kernel_profiles())
    assert SandboxSettings().kernel_env_path == repo_root() / ".venv-sandbox"
    monkeypatch.setenv("ARGUS_SANDBOX_PROFILE", "minimal")
    assert SandboxSettings().kernel_env_path == repo_root() / ".venv-sandbox-minimal"
    monkeypatch.setenv("ARGUS_SANDBOX_KERNEL_ENV", "/opt/kernel-env")
    assert SandboxSettings().kernel_env_path == Path("/opt/kernel-env")  # an explicit environment wins


def test_an_unknown_sandbox_profile_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARGUS_SANDBOX_PROFILE", "gpu-everything")
    with pytest.raises(ValidationError, match=r"unknown kernel profile 'gpu-everything' \(known: default, minimal"):
        SandboxSettings()
    monkeypatch.delenv("ARGUS_SANDBOX_PROFILE")
    result = CliRunner().invoke(app, ["sandbox", "serve", "--profile", "nope"])
    assert result.exit_code == 2
    assert "ARGUS_SANDBOX_PROFILE" in result.output and "unknown kernel profile 'nope'" in result.output


def test_the_warm_pool_defaults_to_the_rollout_group(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    raw["tools"]["sandbox"].pop("warm_pool", None)
    raw["rl"].update(enabled=True, rollouts_per_prompt=12)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    assert spec.tools.sandbox.warm_pool == 12
    assert spec.tools.sandbox.service_env()["ARGUS_SANDBOX_WARM_POOL"] == "12"
    raw["rl"]["enabled"] = False
    path.write_text(yaml.safe_dump(raw))
    assert load_spec(path).tools.sandbox.warm_pool == 4
    raw["tools"]["sandbox"]["profile"] = "everything"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="unknown kernel profile 'everything'"):
        load_spec(path)
