"""The RL trainer as a program: two-process torchrun + DeepSpeed against the real gVisor executor and the
search proxy; MLflow metrics and trajectories; a kill after a checkpoint resumes to the same state. The
vLLM rollout engine against a real vLLM server (the CPU build): token ids and log-probabilities out,
weights loaded in place after a step, and the probe check that catches a server whose weights are not
the trainer's."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from argus import events
from argus.backends.local.launch import TrainingRun
from argus.backends.local.tools import LocalToolEnvironment, ToolEndpoints
from argus.config import RLJobConfig, SandboxSpec, StackSettings
from trainers.checkpoint import CheckpointStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(training_stack: StackSettings) -> StackSettings:
    return training_stack


def warm_start(model_dir: Path, sft_json: Path, steps: int = 300, vl: bool = False) -> None:
    """A few in-process SFT steps on gold trajectories, so the policy emits actions some of the time and
    GRPO groups carry different rewards (a random model's are all 0, and every group is dropped). `vl`:
    the tiny Qwen2.5-VL, trained on the task images as the SFT trainer trains it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from argus.data.formats import read_sharegpt
    from trainers.sft.data import Encoder, collate

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    processor = None
    if vl:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    model = (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_pretrained(model_dir)
    encoder = Encoder(tok, processor, 4096)
    encoded = [e for e in (encoder.encode(x, "x") for x in read_sharegpt(str(sft_json))) if e]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(steps):
        loss = model(**collate(rng.sample(encoded, 4), tok.pad_token_id)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)
    (model_dir / "argus_export.json").write_text(json.dumps({"prompt": "compact", "mlflow_run_id": "sft-run-x"}))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from argus.data.generate import generate
    from argus.models.tiny import init_tiny
    from tests.conftest import local_tools

    root = tmp_path_factory.mktemp("rl-assets")
    generate(
        str(root / "data"),
        tools=local_tools(StackSettings(home=root / "home")),
        seed=23,
        sft_size=48,
        rl_size=8,
        eval_size=4,
        prompt="compact",
    )
    init_tiny("qwen2", str(root / "model"), seed=0)
    warm_start(root / "model", root / "data" / "sft" / "sft.json")
    return {"data": str(root / "data"), "model": str(root / "model")}


@pytest.fixture(scope="module")
def vl_assets(assets: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same data, and the tiny Qwen2.5-VL whose language model starts as the warm-started text policy
    (as Qwen2.5-VL's starts as Qwen2.5), then a short warm start on the images: a VL warm start from
    scratch would cost minutes of the suite for what the text policy already knows."""
    from safetensors.torch import load_file, save_file

    from argus.models.tiny import init_tiny

    model = tmp_path_factory.mktemp("rl-vl") / "model"
    init_tiny("qwen2_5_vl", str(model), seed=0)
    vl = load_file(str(model / "model.safetensors"))
    text = load_file(str(Path(assets["model"]) / "model.safetensors"))
    assert text.keys() <= vl.keys()  # the same tokenizer and language-model sizes
    save_file({**vl, **text}, str(model / "model.safetensors"), metadata={"format": "pt"})
    warm_start(model, Path(assets["data"]) / "sft" / "sft.json", steps=40, vl=True)
    return {**assets, "model": str(model)}


@pytest.fixture(scope="module")
def tools(assets: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolEndpoints]:
    root = tmp_path_factory.mktemp("rl-tools")
    with LocalToolEnvironment(
        root,
        index_path=Path(assets["data"]) / "search" / "index.sqlite",
        sandbox=SandboxSpec(runner="gvisor", warm_pool=8, max_sessions=16),
    ) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def vllm_url(assets: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A vLLM server on the start model, started as `rl.vllm.urls` expects one (dev mode for the in-place
    reload, the sampled distribution's log-probabilities)."""
    from argus.vllm_server import LocalVLLM
    from trainers.rl.vllm import SERVER_ARGS, SERVER_ENV

    log = tmp_path_factory.mktemp("rl-vllm") / "vllm.log"
    server = LocalVLLM(
        assets["model"],
        served_name="policy",
        log_path=log,
        kv_cache_bytes=256 << 20,  # not 0.2 of the machine (4.7 GiB) beside the other tests
        extra_args=SERVER_ARGS,
        env=SERVER_ENV,
    )
    with server as url:
        yield url


def job(name: str, assets: dict[str, str], stack: StackSettings, tools: ToolEndpoints, **rl: Any) -> RLJobConfig:
    spec = {
        "enabled": True,
        "nproc_per_node": 2,
        "precision": "fp32",
        "max_steps": 4,
        "prompts_per_step": 4,
        "mini_batch_prompts": 2,  # two optimizer updates per step, the second clipped against the first
        "rollouts_per_prompt": 2,
        "micro_batch_size": 2,
        "max_turns": 3,
        "max_turn_tokens": 200,  # a gold code turn of the suite is up to 192 tokens
        "max_response_tokens": 512,
        "temperature": 0.7,  # a 0.9M-parameter policy at temperature 1 rarely closes a tag
        "seed": 5,
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant"},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "trajectories_every": 2,
        **rl,
    }
    return RLJobConfig(
        job_name=name,
        prompt="compact",
        dataset=f"{assets['data']}/rl/train.parquet",
        model=assets["model"],
        checkpoint_uri=f"s3://{stack.bucket_checkpoints}/tests/{name}",
        output_uri=f"s3://{stack.bucket_models}/tests/{name}",
        rl=spec,
        mlflow_experiment="rl-tests",
        node_pool="cpu-test",
        lineage={"argus.test": "yes"},
        sandbox_url=tools.sandbox_url,
        search_url=tools.search_url,
    )


def start(cfg: RLJobConfig, stack: StackSettings, tmp: Path, env: dict[str, str] | None = None) -> TrainingRun:
    path = tmp / f"{cfg.job_name}.json"
    path.write_text(cfg.model_dump_json())
    run = TrainingRun(
        "trainers.rl",
        path,
        tmp / f"{cfg.job_name}-{time.monotonic_ns()}.log",
        2,
        extra_env={**stack.client_env(), **(env or {})},
    )
    run.start()
    return run


def steps(seen: list[events.Event]) -> dict[int, events.Step]:
    return {e.step: e for e in seen if isinstance(e, events.Step)}


def weights(uri: str, stack: StackSettings, where: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from argus.storage import download_dir

    return load_file(str(download_dir(uri, where, stack) / "model.safetensors"))


@pytest.mark.reliability
def test_grpo_trains_against_live_tools_and_resumes_exactly_after_a_kill(
    assets: dict[str, str], stack: StackSettings, tools: ToolEndpoints, tmp_path: Path
) -> None:
    import mlflow
    import torch

    # With dynamic sampling (a rank short of groups with signal plays a second batch of prompts), so the
    # resume below also checks that the extra batches are a pure function of the step.
    dynamic = {"filter_groups": {"enabled": True, "max_batches": 2}}
    ref_events: list[events.Event] = []
    ref = start(job("rl-ref", assets, stack, tools, **dynamic), stack, tmp_path)
    assert ref.wait(ref_events.append) == 0, ref.log_path.read_text()[-3000:]
    ref_steps = steps(ref_events)
    assert sorted(ref_steps) == [1, 2, 3, 4]
    for step in ref_steps.values():
        batches = step.metrics["rollout/batches"]  # the mean over the two ranks of the batches each played
        assert batches in (1.0, 1.5, 2.0)
        assert step.metrics["rollout/episodes"] == 8 * batches  # a batch: 2 prompts x 2 rollouts a rank
        assert 0.0 <= step.metrics["rollout/dropped_groups"] <= 1.0
        # A rank trains on an equal-reward group only after its last batch found too few with signal.
        if step.metrics["rollout/dropped_groups"] > 0:
            assert batches >= 1.5
    # The warm-started policy acts: tools were called, and some groups carried a learning signal.
    assert any(s.metrics["rollout/tool_calls_per_episode"] > 0 for s in ref_steps.values())
    assert any(s.metrics["rollout/dropped_groups"] < 1.0 for s in ref_steps.values())

    # The same job killed inside its second save, by a fault-injection point: step 4's files are in place
    # but its manifest is not written. That step directory must never be chosen; step 2 is the latest.
    first: list[events.Event] = []
    fault = {"ARGUS_FAULT": "checkpoint-commit:step-00000004"}
    killed = start(job("rl-killed", assets, stack, tools, **dynamic), stack, tmp_path, env=fault)
    assert killed.wait(first.append) != 0
    store = CheckpointStore(f"s3://{stack.bucket_checkpoints}/tests/rl-killed", stack)
    assert "step-00000004" in store._children()  # the half-committed step is there...
    latest = store.latest()
    assert latest is not None and latest.step == 2  # ...and skipped
    run_id = next(e.mlflow_run_id for e in first if isinstance(e, events.Start))

    second: list[events.Event] = []
    again = start(job("rl-killed", assets, stack, tools, **dynamic), stack, tmp_path)
    assert again.wait(second.append) == 0, again.log_path.read_text()[-3000:]
    resumed = next(e for e in second if isinstance(e, events.Resumed))
    assert resumed.step == 2
    after = steps(second)
    assert sorted(after) == [3, 4]
    for n, step in after.items():  # the same rollouts (seeded by step) and the same updates
        assert step.loss == pytest.approx(ref_steps[n].loss, rel=1e-5, abs=1e-7)
        for key in (
            "reward/overall/mean",
            "rollout/response_tokens",
            "rollout/tool_calls_per_episode",
            "rollout/batches",
        ):
            assert step.metrics[key] == pytest.approx(ref_steps[n].metrics[key], abs=1e-9), key
    a = weights(f"s3://{stack.bucket_models}/tests/rl-ref", stack, tmp_path / "ref")
    b = weights(f"s3://{stack.bucket_models}/tests/rl-killed", stack, tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # MLflow: per-step figures, trajectories as artifacts, lineage to the start model's SFT run.
    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_url)
    run = client.get_run(run_id)
    for key in (
        "reward/overall/mean",
        "reward/overall/std",
        "reward/overall/accuracy",
        "reward/overall/format_rate",
        "rollout/tool_call_rate",
        "rollout/tool_error_rate",
        "rollout/turns",
        "rollout/response_tokens",
        "rollout/dropped_groups",
        "rollout/signal_groups",
        "rollout/batches",
        "rollout/masked_token_share",
        "train/entropy",
        "train/clip_fraction",
        "train/logprob_gap",
        "time/generate_s",
        "time/tools_s",
        "time/train_s",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["train/logprob_gap"] < 1e-3  # the engine sampled with the trainer's weights
    # Mini-batches of 2 prompts: two updates a step, of which those where every group had equal rewards
    # were skipped (no optimizer call) and counted.
    assert run.data.metrics["train/updates"] + run.data.metrics["train/skipped_updates"] == 2
    assert sorted({m.step for m in client.get_metric_history(run_id, "reward/overall/mean")}) == [1, 2, 3, 4]
    # Every `trajectories_every` steps (and the first) a sample of rollouts is on the run as traces.
    traces = client.search_traces(locations=[run.info.experiment_id], run_id=run_id, max_results=100)
    labels = {t.info.tags.get("argus.trace.label") for t in traces}
    assert {"step-1", "step-2", "step-4"} <= labels, labels
    assert all(t.info.tags.get("argus.trace.source") == "rl" for t in traces)
    assert all(any(s.span_type == "TOOL" or s.span_type == "CHAT_MODEL" for s in t.data.spans) for t in traces)
    tags = run.data.tags
    assert tags["argus.stage"] == "rl" and tags["argus.sft.mlflow_run_id"] == "sft-run-x"
    assert tags["argus.base_model.uri"] == assets["model"] and tags["argus.prompt"] == "compact"
    assert run.info.status == "FINISHED"


def test_a_vision_language_policy_trains_on_episodes_that_carry_its_images(
    vl_assets: dict[str, str], stack: StackSettings, tools: ToolEndpoints, tmp_path: Path
) -> None:
    """The tiny Qwen2.5-VL rolls out in-process with the task image (and any image its code returns) in
    its ids and pixel values, and the trainer's updates score them with the pixels: an RL step moves it."""
    import mlflow

    cfg = job("rl-vl", vl_assets, stack, tools, max_steps=2, rollouts_per_prompt=4, trajectories_every=1)
    seen: list[events.Event] = []
    run = start(cfg, stack, tmp_path)
    assert run.wait(seen.append) == 0, run.log_path.read_text()[-3000:]
    done = steps(seen)
    assert sorted(done) == [1, 2]
    # Some group carried a signal and an update was made from it: the loss moved off zero.
    trained = [s for s in done.values() if s.metrics["rollout/dropped_groups"] < 1.0]
    assert trained and any(s.loss != 0.0 for s in trained), [(s.loss, s.metrics) for s in done.values()]
    run_id = next(e.mlflow_run_id for e in seen if isinstance(e, events.Start))
    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_url)
    # The engine sampled what the trainer scores: with the pixels on both sides, the log-probabilities agree.
    gaps = [m.value for m in client.get_metric_history(run_id, "train/logprob_gap")]
    assert gaps and max(gaps) < 1e-3, gaps
    # The trajectories on the run show what the policy saw: the task image opens every one of them (an
    # MLflow trace attachment, which the UI shows inline).
    traces = client.search_traces(locations=[client.get_run(run_id).info.experiment_id], run_id=run_id)
    assert traces
    for trace in traces:
        root = next(s for s in trace.data.spans if s.parent_id is None)
        assert "mlflow-attachment://" in json.dumps(root.inputs["messages"])


def test_a_start_model_trained_with_another_prompt_is_refused(
    assets: dict[str, str], stack: StackSettings, tools: ToolEndpoints, tmp_path: Path
) -> None:
    cfg = job("rl-prompt", assets, stack, tools).model_copy(update={"prompt": "deepeyesv2"})
    run = start(cfg, stack, tmp_path)
    assert run.wait(lambda _e: None) != 0
    log = run.log_path.read_text()
    assert "trained with the 'compact' prompt" in log and "with the 'deepeyesv2' prompt" in log


def test_train_rl_cli_runs_a_job_with_the_specs_tools(
    assets: dict[str, str], stack: StackSettings, vllm_url: str, tmp_path: Path
) -> None:
    """`argus train rl`: starts the spec's code executor and search proxy, torchruns the job, prints
    where the export went; on a spec that generates its data it asks for --data. The spec's engine is
    vLLM, one server for both ranks (`rl.vllm.urls`): rank 0 loads the weights into it after the step,
    both check them there."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec["rl"].update(max_steps=1, prompts_per_step=2, mini_batch_prompts=2, rollouts_per_prompt=2, micro_batch_size=2)
    spec["rl"].update(max_turns=2)
    spec["rl"].update(engine="vllm", vllm={"urls": [vllm_url]})
    spec["tools"]["sandbox"]["warm_pool"] = 2
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "ARGUS_HOME": str(stack.home), "COLUMNS": "200"}
    argv = [sys.executable, "-m", "argus.cli", "train", "rl", "--config", str(path), "--model", assets["model"]]
    missing = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "argus data generate" in missing.stderr

    out = str(tmp_path / "export")
    done = subprocess.run(
        [*argv, "--data", f"{assets['data']}/rl/train.parquet", "--output", out, "--run-name", "cli-rl"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["export"] == out
    assert (Path(out) / "model.safetensors").exists()
    assert json.loads((Path(out) / "argus_export.json").read_text())["stage"] == "rl"
    # The engine sampled with the trainer's weights, and took the step's weights (checked there).
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_url)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.mlflow.runName = 'cli-rl'")
    assert run, "no MLflow run for the job"
    metrics = run[0].data.metrics
    assert metrics["train/logprob_gap"] < 1e-3 and metrics["sync/probe_gap"] < 1e-4
    assert run[0].data.params["engine"] == "vllm"


def test_the_vllm_engine_samples_ids_and_a_weight_sync_is_checked(
    assets: dict[str, str], vllm_url: str, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from argus.agent.prompts import opening
    from argus.models import chatml
    from trainers.rl.rollout import STOP_TOKENS
    from trainers.rl.vllm import VLLMEngineError, VLLMServerEngine, probe_gap, write_weights

    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    stops = [int(tok.convert_tokens_to_ids(t)) for t in STOP_TOKENS]
    prompt = chatml.encode(tok, opening("compact", "What is 17 * 23?")) + chatml.parts(tok, "assistant", "")[0]
    engine = VLLMServerEngine(vllm_url, "policy", stops, temperature=0.7)
    try:
        assert probe_gap(engine, model, prompt) < 1e-4  # the server serves the trainer's start weights

        # A group: four episodes with one opening, each sampled with its own seed.
        samples = engine.generate([prompt] * 4, [24] * 4, seed=11)
        assert len({tuple(s.ids) for s in samples}) > 1
        for s in samples:
            assert 0 < len(s.ids) <= 24 and len(s.logprobs) == len(s.ids)
            assert s.stopped == (s.ids[-1] in stops)
            # The log-probabilities are those of the distribution sampled from (logits / temperature).
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + s.ids])).logits[0, len(prompt) - 1 : -1]
            ours = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(s.ids)[:, None]).squeeze(-1)
            assert torch.allclose(ours, torch.tensor(s.logprobs), atol=1e-3)
        # Not asserted: the same seeds giving the same samples. Requests that share a server batch (and
        # its prefix cache) do not repeat bit for bit, as vLLM documents; a resumed vLLM-engine job
        # replays its data order and seeds, not its exact rollouts (the in-process engine's does).
        # A turn ends on its stop token, included; without one it runs to its budget (EOS ignored).
        everything = VLLMServerEngine(vllm_url, "policy", list(range(len(tok))), temperature=1.0)
        stopped = everything.generate([prompt], [16], seed=1)[0]
        assert stopped.stopped and len(stopped.ids) == 1
        nothing = VLLMServerEngine(vllm_url, "policy", [], temperature=1.0)
        assert [len(s.ids) for s in nothing.generate([prompt] * 2, [16, 9], seed=1)] == [16, 9]

        # The trainer takes a step the server has not seen: the probe sees it...
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(3)) * 0.05)
        assert probe_gap(engine, model, prompt) > 0.02
        # ...and so does it after a "sync" that drops the tied output head (Hugging Face's save_pretrained).
        model.save_pretrained(tmp_path / "pretrained")
        engine.load_weights(tmp_path / "pretrained")
        assert probe_gap(engine, model, prompt) > 0.02
        # A full state dict loads in place, and the server then agrees with the trainer.
        engine.load_weights(write_weights(model, tmp_path / "step-1"))
        assert probe_gap(engine, model, prompt) < 1e-4
        # A path with no weights is refused here: vLLM's reload would take the server down with it.
        with pytest.raises(VLLMEngineError, match=r"no model\.safetensors"):
            engine.load_weights(tmp_path / "missing")
        assert probe_gap(engine, model, prompt) < 1e-4
    finally:
        # Back to the start model for the tests that share the server (their trainers sync at start anyway).
        start = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
        engine.load_weights(write_weights(start, tmp_path / "start"))
        engine.close()
