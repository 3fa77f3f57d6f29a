"""`argus data generate`: the miniature suite as DeepEyesV2 files, gold trajectories run for real.

Layout under the output URI (a local directory or an s3:// prefix):

    sft/sft.json + sft/images/          LLaMA-Factory sharegpt, one gold trajectory per task
    rl/train.parquet                    verl rows: prompt, image, ground truth
    dev/dev.parquet                     the target distribution on entities of its own: where settings are chosen
    eval/eval.parquet                   held out (entities never seen in training or dev)
    search/corpus.jsonl                 offline text corpus
    search/images.jsonl + images/       offline image corpus (entity emblems)
    search/index.sqlite                 the offline index built from both
    search/image_search_cache.json      MMSearch-R1 format cache of the emblem tasks' image searches
    manifest.json                       seed, sizes, tasks per family and slice, teachers, sha256 of every file

SFT trajectories are produced by playing the gold turns through the real code executor and search
proxy, so every observation is what a rollout would see; a gold trajectory that does not reach reward
1.0 stops the generation (it would teach the model a wrong answer). The caller brings the tools up
(`tools`: a backend's `tool_environment`), over the offline index this module has just written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from argus.agent.env import AgentEnv, ScriptedPolicy, ToolClients, Trajectory
from argus.config import Prompt, SandboxSpec, StackSettings, ToolsSpec
from argus.data import formats
from argus.data.search_index import build_index
from argus.data.tasks import MIXES, SLICES, MiniTask, Suite, build_suite, teacher_mix
from argus.storage import join_uri, upload_files, write_uri

# The turns a demonstration may take: the cold start stands for trajectories distilled from strong models
# with room to spare, so a habit that spends a turn (checking a search) still succeeds on them.
DEMO_TURNS = 9


class ToolUrls(Protocol):
    sandbox_url: str
    search_url: str


# (what to run, the directory holding the offline index) -> the running tools, for as long as the block
# runs: `functools.partial(backend.tool_environment, name)` is one.
ToolsUp = Callable[[ToolsSpec, str], AbstractContextManager[ToolUrls]]


class GenerationError(RuntimeError):
    pass


@dataclass
class GenerateResult:
    out: str
    manifest: dict[str, Any]


def write_search_corpus(suite: Suite, root: Path) -> Path:
    """Corpus files and the offline index in a local directory; returns the index path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    docs = [e.document() for e in suite.entities]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs))
    lines = []
    for e in suite.entities:
        rel = f"images/{e.name.lower()}.png"
        (root / rel).write_bytes(e.emblem())
        lines.append(
            json.dumps(
                {
                    "id": f"emblem-{e.name.lower()}",
                    "title": f"Emblem of {e.name}",
                    "url": e.document()["url"],
                    "image": rel,
                },
                sort_keys=True,
            )
            + "\n"
        )
    (root / "images.jsonl").write_text("".join(lines))
    index = root / "index.sqlite"
    index.unlink(missing_ok=True)
    build_index(index, corpus=root / "corpus.jsonl", images=root / "images.jsonl")
    return index


async def run_gold(
    tasks: list[MiniTask],
    tools: ToolClients,
    *,
    prompt: Prompt = "deepeyesv2",
    concurrency: int = 8,
    on_done: Callable[[Trajectory], None] = lambda _t: None,
) -> list[Trajectory]:
    env = AgentEnv(tools, max_turns=DEMO_TURNS, prompt=prompt)
    limit = asyncio.Semaphore(concurrency)

    async def one(mini: MiniTask) -> Trajectory:
        async with limit:
            traj = await env.run(mini.task, ScriptedPolicy(mini.scripts[mini.teacher]))
        assert traj.reward is not None
        if traj.reward.score != 1.0 or traj.finish != "answer":
            observations = [m["content"][:400] for m in traj.messages[2:] if m["role"] == "user"]
            raise GenerationError(
                f"gold trajectory of {mini.task.id} scored {traj.reward.score} "
                f"(finish={traj.finish}); observations: {observations}"
            )
        on_done(traj)
        return traj

    return list(await asyncio.gather(*(one(m) for m in tasks)))


def generate(
    out: str,
    *,
    tools: ToolsUp,
    seed: int = 0,
    sft_size: int = 200,
    rl_size: int = 200,
    eval_size: int = 60,
    dev_size: int | None = None,
    teachers: Mapping[str, float] | None = None,
    # The gold trajectories run Argus's own scripted solutions, not model output, so they need no
    # gVisor: the process runner writes the same files (all 453 of the quickstart suite hash the same)
    # in 30 s instead of 86 s on 2 cores. Rollouts and evaluations keep the spec's runner.
    runner: Literal["gvisor", "process"] = "process",
    prompt: Prompt = "deepeyesv2",
    stack: StackSettings | None = None,
    on_progress: Callable[[str, int, int], None] = lambda _s, _i, _n: None,
) -> GenerateResult:
    suite = build_suite(seed, sft_size, rl_size, eval_size, dev_size, teachers)
    with tempfile.TemporaryDirectory(prefix="argus-data-") as tmp:
        staging = Path(tmp) / "out"
        index = write_search_corpus(suite, staging / "search")
        gold_tools = ToolsSpec(sandbox=SandboxSpec(runner=runner, warm_pool=6))
        with tools(gold_tools, str(index.parent)) as endpoints:

            async def go() -> list[Trajectory]:
                tools = ToolClients(endpoints.sandbox_url, endpoints.search_url, run_id=f"generate-{seed}")
                done = 0

                def tick(_t: Trajectory) -> None:
                    nonlocal done
                    done += 1
                    on_progress("gold trajectories", done, len(suite.sft))

                try:
                    return await run_gold(suite.sft, tools, prompt=prompt, on_done=tick)
                finally:
                    await tools.aclose()

            trajectories = asyncio.run(go())
            cache = _emblem_cache(suite, trajectories)

        formats.write_sharegpt(str(staging / "sft" / "sft.json"), [t.to_sharegpt() for t in trajectories])
        formats.write_rl_parquet(str(staging / "rl" / "train.parquet"), [m.task for m in suite.rl], prompt=prompt)
        formats.write_rl_parquet(str(staging / "dev" / "dev.parquet"), [m.task for m in suite.dev], prompt=prompt)
        formats.write_rl_parquet(str(staging / "eval" / "eval.parquet"), [m.task for m in suite.eval], prompt=prompt)
        formats.write_image_search_cache(str(staging / "search" / "image_search_cache.json"), cache)

        manifest: dict[str, Any] = {
            "seed": seed,
            "prompt": prompt,
            "sizes": {"sft": sft_size, "rl": rl_size, "dev": len(suite.dev), "eval": eval_size},
            "families": {
                name: dict(sorted(Counter(m.task.family for m in suite.split(name)).items()))
                for name in ("sft", "rl", "dev", "eval")
            },
            "slices": {
                name: dict(sorted(Counter(m.task.slice for m in suite.split(name)).items()))
                for name in ("sft", "rl", "dev", "eval")
            },
            # How the cold start was built (argus.data.tasks): each teacher's demonstrations per slice, the
            # template mix of each split, and the option each decision slice needs on the target splits.
            "teachers": teacher_mix(suite.sft),
            "teacher_weights": dict(teachers) if teachers else "even",
            "mixes": {name: dict(mix) for name, mix in MIXES.items()},
            "decisions": {name: s.right for name, s in SLICES.items() if s.right},
            "entities": {name: len(pool) for name, pool in suite.pools.items()},
            "files": {},
        }
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(staging).as_posix()
            manifest["files"][rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        on_progress("upload", 0, len(files))
        upload_files(
            [(path, join_uri(out, *path.relative_to(staging).parts)) for path in files],
            stack,
            on_done=lambda i: on_progress("upload", i, len(files)),
        )
        # The manifest last: a reader that finds it knows every file it lists is complete.
        write_uri(join_uri(out, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True).encode(), stack)
    return GenerateResult(out=out, manifest=manifest)


def _emblem_cache(suite: Suite, trajectories: list[Trajectory]) -> dict[str, list[tuple[str, bytes]]]:
    """The image-search results the gold emblem trajectories received, in MMSearch-R1's cache shape."""
    cache: dict[str, list[tuple[str, bytes]]] = {}
    for mini, traj in zip(suite.sft, trajectories, strict=True):
        for i, message in enumerate(traj.messages):
            if message["role"] == "user" and "A Google image search for the image found" in message["content"]:
                titles = [
                    line[1:].rsplit("]", 1)[0] for line in message["content"].splitlines() if line.startswith("[")
                ]
                first_image = sum(m["content"].count("<image>") for m in traj.messages[1:i])
                images = traj.images[first_image : first_image + len(titles)]
                cache[mini.task.id] = list(zip(titles, images, strict=False))
    return cache
