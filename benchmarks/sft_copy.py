"""Which tiny model learns the miniature suite: an ablation of the quickstart's model choices, side by side.

    .venv/bin/python benchmarks/sft_copy.py [--steps 900] [--train 1000] [--held 200] [--threads 2]

Every configuration trains from scratch on the same gold SFT trajectories (suite seed 0, compact prompt,
generated through the real tools by `argus data generate`) with the quickstart's optimiser (AdamW, lr
3e-3, betas 0.9/0.95, cosine, batches of 8 in length buckets), and is scored on gold trajectories of
another seed's suite, whose entities and numbers it has never seen. The score is the share of held-out
trajectories whose every assistant token is the model's argmax given the gold prefix: exactly the
trajectories greedy decoding would replay, tool observations included, without serving anything. It
bounds what the pipeline's live evaluation can show and costs seconds instead of minutes.

The configurations:
- `nano`: the earlier quickstart model (4 heads of 32, no copy pre-training);
- `mini, no pre-training`: two heads of 64, trained on the suite alone;
- `mini + copy pre-training` (Argus's quickstart): the same, pre-trained to copy until the onset of the
  induction phase change (`argus.models.tiny.pretrain_copying`);
- `mini + copy, one-digit numbers`: as Argus's, with Qwen2's own number pre-tokenisation (single digits)
  instead of runs of one to three.
"""

from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from argus.data.formats import read_sharegpt  # noqa: E402
from argus.models import tiny  # noqa: E402
from trainers.sft.data import IGNORE, Encoded, Encoder, collate  # noqa: E402

FAMILIES = ("perception", "reasoning", "search", "integrated")


def family(question: str) -> str:
    if "Multiply" in question or "emblem" in question:
        return "integrated"
    if "In what year" in question:
        return "search"
    if "What is" in question:
        return "reasoning"
    return "perception"


def generate(out: Path, seed: int, n: int) -> Path:
    cmd = [str(REPO / ".venv" / "bin" / "argus"), "data", "generate", "--out", str(out), "--seed", str(seed)]
    cmd += ["--sft-size", str(n), "--rl-size", "1", "--eval-size", "1", "--prompt", "compact"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / "sft" / "sft.json"


def encode(tok: Any, path: Path, n: int) -> list[tuple[Encoded, str]]:
    enc = Encoder(tok, None, 4096)
    out = []
    for i, ex in enumerate(read_sharegpt(str(path), check_images=False)[:n]):
        e = enc.encode(ex, str(i))
        if e is not None:
            out.append((e, family(str(ex.messages[1]["content"]))))
    return out


def batches(lengths: list[int], size: int, rng: random.Random) -> Any:
    """Shuffled batches of similar lengths, as the trainer's `length_buckets`."""
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        window = size * 16
        rounds = []
        for s in range(0, len(order) - size + 1, window):
            chunk = sorted(order[s : s + window], key=lambda i: lengths[i])
            rounds += [chunk[k : k + size] for k in range(0, len(chunk) - size + 1, size)]
        rng.shuffle(rounds)
        yield from rounds


@torch.no_grad()
def replayed(model: Any, held: list[tuple[Encoded, str]]) -> dict[str, float]:
    model.eval()
    hits: dict[str, list[bool]] = {f: [] for f in FAMILIES}
    for e, fam in held:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        labels = torch.tensor(e.labels)[1:]
        sel = labels != IGNORE
        hits[fam].append(bool((logits.argmax(-1)[sel] == labels[sel]).all()))
    model.train()
    out = {f: sum(h) / len(h) for f, h in hits.items() if h}
    out["overall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return out


def run(name: str, size: tiny.Size, pretrain: bool, one_digit: bool, paths: tuple[Path, Path], args: Any) -> dict:
    saved = tiny.PRETOKENIZE
    if one_digit:
        tiny.PRETOKENIZE = saved.replace(r"\p{N}{1,3}", r"\p{N}")
    try:
        model, tok, _ = tiny.build("qwen2", 0, size)
    finally:
        tiny.PRETOKENIZE = saved
    started = time.monotonic()
    copy_steps = 0
    if pretrain:
        copy_steps = tiny.pretrain_copying(model, tok, seed=0).steps
    pretrain_s = time.monotonic() - started
    train, held = encode(tok, paths[0], args.train), encode(tok, paths[1], args.held)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, int(0.025 * args.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    it = batches([len(e.input_ids) for e, _ in train], 8, random.Random(0))
    model.train()
    started = time.monotonic()
    for _ in range(args.steps):
        batch = collate([train[i][0] for i in next(it)], tok.pad_token_id)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    sft_s = time.monotonic() - started
    scores = replayed(model, held)
    print(f"  {name}: {scores['overall']:.3f} ({copy_steps} copy steps, {sft_s:.0f} s SFT)", flush=True)
    return {"name": name, "copy_steps": copy_steps, "pretrain_s": pretrain_s, "sft_s": sft_s, **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=900, help="SFT steps of 8 examples")
    parser.add_argument("--train", type=int, default=1000, help="training trajectories (suite seed 0)")
    parser.add_argument("--held", type=int, default=200, help="held-out trajectories (suite seed 7)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="argus-sft-copy-") as tmp:
        print("generating the gold trajectories (argus data generate)…", flush=True)
        paths = (generate(Path(tmp) / "train", 0, args.train), generate(Path(tmp) / "held", 7, args.held))
        print(f"{args.steps} SFT steps on {args.train} trajectories, {args.held} held out:", flush=True)
        rows = [
            run("nano (4x32 heads), no pre-training", "nano", False, False, paths, args),
            run("mini (2x64 heads), no pre-training", "mini", False, False, paths, args),
            run("mini + copy pre-training (Argus)", "mini", True, False, paths, args),
            run("mini + copy, one-digit numbers", "mini", True, True, paths, args),
        ]
    print()
    print("| model | " + " | ".join(("overall", *FAMILIES)) + " | copy steps | SFT s |")
    print("|---|" + "---|" * (len(FAMILIES) + 3))
    for r in rows:
        cells = " | ".join(f"{r.get(f, math.nan):.3f}" for f in ("overall", *FAMILIES))
        print(f"| {r['name']} | {cells} | {r['copy_steps']} | {r['sft_s']:.0f} |")
    print("\nscore: held-out gold trajectories replayed exactly under teacher forcing (greedy would replay them)")


if __name__ == "__main__":
    main()
