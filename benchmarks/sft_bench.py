"""SFT trainer benchmark: Argus' trainer (DeepSpeed ZeRO-2, MLflow, checkpoints) against a plain
PyTorch DDP loop on the same tiny model, data, process count and optimizer, in one run.

    .venv/bin/python benchmarks/sft_bench.py [--steps 24]

Throughput is measured in steady state from the wall clock between step events (steps 3..N), with
the intervals that contain a checkpoint save left out and reported on their own.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from argus.backends.local.launch import TrainingRun, pytorchjob_env  # noqa: E402
from argus.config import SFTJobConfig, StackSettings  # noqa: E402
from argus.supervision import free_port  # noqa: E402


def steady_tokens_per_s(steps: list[dict[str, Any]], pauses: list[float]) -> float:
    tokens = seconds = 0.0
    for prev, cur in itertools.pairwise(steps):
        if cur["step"] < 3 or any(prev["time"] < p <= cur["time"] for p in pauses):
            continue
        tokens += cur["tokens"]
        seconds += cur["time"] - prev["time"]
    return tokens / seconds if seconds else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    console = Console()

    with tempfile.TemporaryDirectory(prefix="argus-sft-bench-") as tmp:
        root = Path(tmp)
        env = {
            **os.environ,
            "ARGUS_HOME": str(root / "home"),
            "ARGUS_S3_PORT": str(free_port()),
            "ARGUS_MLFLOW_PORT": str(free_port()),
            "ARGUS_PREFECT_PORT": str(free_port()),
        }
        cli = [sys.executable, "-m", "argus.cli"]
        console.print("stack, data and tiny model …")
        subprocess.run([*cli, "stack", "up"], env=env, check=True, capture_output=True)
        try:
            stack = StackSettings.model_validate(
                {
                    "home": env["ARGUS_HOME"],
                    "s3_port": env["ARGUS_S3_PORT"],
                    "mlflow_port": env["ARGUS_MLFLOW_PORT"],
                    "prefect_port": env["ARGUS_PREFECT_PORT"],
                }
            )
            subprocess.run(
                [
                    *cli,
                    "data",
                    "generate",
                    "--out",
                    str(root / "data"),
                    "--sft-size",
                    "64",
                    "--rl-size",
                    "4",
                    "--eval-size",
                    "4",
                    "--runner",
                    "process",
                ],
                env=env,
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [*cli, "models", "init-tiny", "--arch", "qwen2", "--out", str(root / "model")],
                env=env,
                check=True,
                capture_output=True,
            )
            data, model = str(root / "data" / "sft" / "sft.json"), str(root / "model")

            console.print("baseline: plain PyTorch DDP loop …")
            base = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    str(REPO / "benchmarks" / "_plain_sft.py"),
                    model,
                    data,
                    str(args.steps),
                    str(args.micro_batch),
                    "2048",
                ],
                env={**env, **pytorchjob_env(2)},
                check=True,
                capture_output=True,
                text=True,
            )
            base_steps = [json.loads(line[9:]) for line in base.stdout.splitlines() if line.startswith("BASELINE ")]
            baseline = steady_tokens_per_s(base_steps, [])

            console.print("Argus trainer (DeepSpeed ZeRO-2, MLflow, S3 checkpoints) …")

            def run(max_steps: int) -> list[dict[str, Any]]:
                job = SFTJobConfig(
                    job_name="bench",
                    dataset=data,
                    model=model,
                    checkpoint_uri=f"s3://{stack.bucket_checkpoints}/bench",
                    output_uri=str(root / "export"),
                    sft={
                        "nproc_per_node": 2,
                        "precision": "fp32",
                        "max_steps": max_steps,
                        "micro_batch_size": args.micro_batch,
                        "grad_accum": 1,
                        "max_seq_len": 2048,
                        "seed": 3,
                        "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant"},
                        "checkpoint": {"every_steps": max(1, args.steps // 2), "keep_last": 1},
                    },
                    mlflow_experiment="bench",
                )
                path = root / f"job-{max_steps}.json"
                path.write_text(job.model_dump_json())
                training = TrainingRun(
                    "trainers.sft", path, root / f"train-{max_steps}.log", 2, extra_env=stack.client_env()
                )
                training.start()
                events: list[dict[str, Any]] = []
                if training.wait(events.append) != 0:
                    raise SystemExit(training.log_path.read_text()[-3000:])
                return events

            events = run(args.steps)
            saves = [e for e in events if e["event"] == "checkpoint"]
            ours = steady_tokens_per_s([e for e in events if e["event"] == "step"], [e["time"] for e in saves])
            resumed = run(args.steps + 2)
            resume = next(e for e in resumed if e["event"] == "resumed")
        finally:
            subprocess.run([*cli, "stack", "down"], env=env, capture_output=True)

    overhead = 1 - ours / baseline if baseline else float("nan")
    table = Table(
        title=f"Argus SFT trainer — tiny Qwen2, 2 processes, micro-batch {args.micro_batch}, {args.steps} steps"
    )
    for col in ("metric", "Argus trainer", "plain PyTorch DDP (same run)", "target"):
        table.add_column(col)
    table.add_row("steady-state tokens/s", f"{ours:,.0f}", f"{baseline:,.0f}", "")
    table.add_row("overhead vs plain loop", f"{overhead * 100:.1f} %", "", "≤ 10 %")
    table.add_row(
        "checkpoint save (ZeRO states → S3, manifest)",
        f"{statistics.median(e['seconds'] for e in saves):.2f} s",
        "",
        "",
    )
    table.add_row("resume (verify, download, load)", f"{resume['seconds']:.2f} s", "", "")
    console.print(table)


if __name__ == "__main__":
    main()
