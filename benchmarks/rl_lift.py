"""The paper's ablation table in miniature: does RL improve the agent beyond what more SFT does?

    .venv/bin/python benchmarks/rl_lift.py [--spec examples/quickstart.yaml] [--run-name quickstart] \\
        [--samples 8] [--out lift.json]
    .venv/bin/python benchmarks/rl_lift.py --even-mix --run-name lift-even     # the sensitivity check

On the held-out eval split of the spec's generated suite, five models:
- **base**: the untrained tiny model;
- **RL from base**: the spec's RL stage started from the base model (DeepEyesV2: RL alone fails);
- **SFT**: the cold start;
- **control**: SFT continued on its own data for as many optimizer steps as the RL run makes, at RL's
  learning rate (constant, no warm-up): what the RL stage's compute buys without the reward;
- **SFT → RL**: the pipeline's RL model.

For each model: greedy accuracy with its 95 % Wilson interval, sampled pass@1 and pass@k (k samples of
every task at temperature 1), tool calls per episode and the tool-error rate, overall and per slice, the
strategy rates; and the exact McNemar test per task for SFT → RL against SFT and against the control. The
SFT and RL models are the pipeline's (`argus run SPEC --run-name NAME`, reused where that run finished
already); the control and RL from base are trained here with the spec's settings through the local
backend, as the pipeline trains its own. Every model is served by vLLM and evaluated with the live tools.
Nothing here is tuned: the settings are the spec's, chosen on the dev split. `--even-mix` runs the same
with every teacher at an equal share of the demonstrations (the suite's mix is 0.6 of the habits that do
not carry over).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from argus.agent.evaluation import EvalRun, behaviour_table, mcnemar, with_interval  # noqa: E402
from argus.config import CurveSpec, PipelineSpec, ServingTarget, StackSettings  # noqa: E402
from argus.data.tasks import DECISION_SLICES  # noqa: E402

console = Console(width=200)


def pipeline_result(spec_file: Path, run_name: str, env: dict[str, str], log: Path) -> Any:
    """Run (or finish) the pipeline, then read its result from Prefect as `argus runs show` does."""
    with log.open("a") as out:
        subprocess.run(
            [str(REPO / ".venv/bin/argus"), "run", str(spec_file), "--run-name", run_name],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    assert run.state is not None
    return run.state.result()


def train(backend: Any, job: Any, what: str) -> None:
    started = time.monotonic()
    result = backend.run(job)
    if not result.succeeded:
        raise SystemExit(f"{what} failed: {result.message}\n{result.log_tail}")
    console.print(f"{what}: {job.name} in {time.monotonic() - started:.0f} s", highlight=False)


def control_spec(spec: PipelineSpec) -> PipelineSpec:
    """SFT continued for the RL run's optimizer updates at RL's learning rate, constant, no warm-up."""
    assert spec.rl.max_steps is not None, "the RL stage needs rl.max_steps for a control of the same length"
    updates = spec.rl.max_steps * spec.rl.updates_per_step
    optim = spec.sft.optim.model_copy(update={"lr": spec.rl.optim.lr, "warmup_ratio": 0.0, "scheduler": "constant"})
    sft = spec.sft.model_copy(update={"max_steps": updates, "optim": optim, "curve": CurveSpec()})
    return spec.model_copy(update={"sft": sft})


def evaluate(
    backend: Any, spec: PipelineSpec, model_uri: str, tasks: list[Any], tools: Any, label: str, k: int
) -> EvalRun:
    from flows.stages.evaluate import serve_and_evaluate

    suite = spec.eval.suites[0]
    target = spec.serving.staging or ServingTarget()
    started = time.monotonic()
    result = serve_and_evaluate(
        backend,
        name=f"lift-{label}",
        model_uri=model_uri,
        tasks=tasks,
        tools=tools,
        target=target,
        max_turns=suite.max_turns,
        max_tokens=suite.max_tokens,
        concurrency=suite.concurrency,
        prompt=spec.prompt,
        samples=k,
        run_id=f"lift-{label}",
    )
    console.print(f"evaluated {label}: {time.monotonic() - started:.0f} s", highlight=False)
    return result


def share_solved(trajectories: list[Any]) -> float:
    return sum(1 for t in trajectories if t.reward and t.reward.accuracy >= 1.0) / max(len(trajectories), 1)


def solved(run: EvalRun) -> list[bool]:
    return [bool(t.reward and t.reward.accuracy >= 1.0) for t in run.trajectories]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "quickstart.yaml")
    parser.add_argument("--run-name", default="quickstart", help="the pipeline run to take SFT and RL from (or make)")
    parser.add_argument("--home", type=Path, default=None, help="ARGUS_HOME (default: the environment's)")
    parser.add_argument("--samples", type=int, default=8, help="k of pass@k: samples of every eval task")
    parser.add_argument(
        "--even-mix",
        action="store_true",
        help="the sensitivity check: the spec with every teacher at an equal share of the demonstrations",
    )
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    args = parser.parse_args()

    from argus.backends.jobs import rl_job, sft_job
    from argus.backends.local.backend import LocalBackend
    from argus.cli._common import prepare_flow_env
    from argus.data.formats import read_rl_parquet
    from argus.specfile import load_spec
    from argus.stack import effective_settings, up

    env = dict(os.environ)
    if args.home:
        env["ARGUS_HOME"] = str(args.home)
    os.environ.update(env)
    settings = effective_settings(StackSettings())
    work = settings.home / "lift" / args.run_name
    work.mkdir(parents=True, exist_ok=True)
    spec_file = args.spec
    if args.even_mix:
        import yaml

        raw = yaml.safe_load(args.spec.read_text())
        raw["data"]["generate"]["teachers"] = {"ada": 1, "bo": 1, "cy": 1, "dee": 1}
        spec_file = work / f"{args.spec.stem}-even.yaml"
        spec_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_spec(spec_file)
    started = time.monotonic()
    up(settings)
    prepare_flow_env(settings)  # this process's Prefect and MLflow clients talk to the stack
    result = pipeline_result(spec_file, args.run_name, env, work / "pipeline.log")
    console.print(f"pipeline {args.run_name}: {time.monotonic() - started:.0f} s", highlight=False)
    assert result.rl is not None, "the spec must run its RL stage"

    backend = LocalBackend(settings)
    models = {"base": result.base_eval.model_uri, "SFT": result.sft.model_uri, "SFT->RL": result.rl.model_uri}
    rl_updates = (spec.rl.max_steps or 0) * spec.rl.updates_per_step
    tasks = read_rl_parquet(result.data.eval, settings)
    runs: dict[str, EvalRun] = {}
    try:
        control = sft_job(
            control_spec(spec),
            settings,
            name=f"{args.run_name}-control",
            dataset=result.data.sft,
            model=result.sft.model_uri,
        )
        train(backend, control, f"control (SFT + {rl_updates} steps at lr {spec.rl.optim.lr})")
        models["control"] = control.config["output_uri"]
        with backend.tool_environment(f"{args.run_name}-lift", spec.tools, result.data.search) as tools:
            from_base = rl_job(
                spec,
                settings,
                name=f"{args.run_name}-rl-base",
                dataset=result.data.rl,
                model=result.base_eval.model_uri,
                tools=tools,
            )
            train(backend, from_base, "RL from the base model")
            models["RL from base"] = from_base.config["output_uri"]
            for label in ("base", "RL from base", "SFT", "control", "SFT->RL"):
                runs[label] = evaluate(backend, spec, models[label], tasks, tools, label, args.samples)
    finally:
        backend.close()

    k = args.samples
    table = Table(title=f"held-out eval split, {len(tasks)} tasks, greedy; pass@1/pass@{k} over {k} samples a task")
    for col in (
        "model",
        "accuracy [95 % CI]",
        "format",
        "pass@1",
        f"pass@{k}",
        "tool calls / ep",
        "tool errors",
        "decision slices",
        "other slices",
    ):
        table.add_column(col, justify="left" if col == "model" else "right")
    figures: dict[str, Any] = {"models": models, "tasks": len(tasks), "samples": k, "rl_updates": rl_updates}
    for label, run in runs.items():
        overall = run.summary["overall"]
        decision = [t for t in run.trajectories if t.slice in DECISION_SLICES]
        other = [t for t in run.trajectories if t.slice not in DECISION_SLICES]
        table.add_row(
            label,
            with_interval(overall.accuracy, overall.accuracy_low, overall.accuracy_high),
            f"{overall.format_rate:.3f}",
            f"{run.sampled['overall']['pass_at_1']:.3f}",
            f"{run.sampled['overall'][f'pass_at_{k}']:.3f}",
            f"{overall.behaviour['tool_calls_per_episode']:.2f}",
            f"{overall.tool_error_rate:.3f}",
            f"{share_solved(decision):.3f} ({len(decision)})",
            f"{share_solved(other):.3f} ({len(other)})",
        )
        figures[label] = {"overall": run.metrics()["overall"], "slices": run.slice_metrics()}
    console.print(table)
    columns, rows = behaviour_table({label: run.slice_metrics() for label, run in runs.items() if label != "base"})
    per_slice = Table(title="per slice (greedy): accuracy, strategy rates, tool calls per episode, repeat-call rate")
    for col in columns:
        per_slice.add_column(col, overflow="fold")
    for row in rows:
        per_slice.add_row(*row)
    console.print(per_slice)
    tests = Table(title="paired per task (exact McNemar): tasks only the first solved / only the second / p")
    for col in ("comparison", "only first", "only second", "p"):
        tests.add_column(col)
    figures["paired"] = {}
    for first, second in (("SFT", "SFT->RL"), ("control", "SFT->RL"), ("SFT", "control"), ("base", "RL from base")):
        b, c, p = mcnemar(solved(runs[first]), solved(runs[second]))
        tests.add_row(f"{first} vs {second}", str(b), str(c), f"{p:.2g}")
        figures["paired"][f"{first} vs {second}"] = {"only_first": b, "only_second": c, "p": p}
    console.print(tests)
    console.print(f"total {time.monotonic() - started:.0f} s", highlight=False)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
