"""Tiny Qwen2 and Qwen2.5-VL models built from configs, with a locally trained tokenizer.

Nothing is downloaded: the BPE tokenizer is trained on the DeepEyesV2 prompts and the miniature suite's
text, gets Qwen's chat special tokens and chat template, and keeps the action tags (`<think>`,
`<code>`, `<tool_call>`, `<answer>`, ...) as single tokens so a tiny model can learn the format. The
models are randomly initialised (seeded) and saved with `save_pretrained`, the layout every real
checkpoint has, so the same loading code serves a 7B model from the hub or the object store.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from argus.config import StackSettings
from argus.data.tasks import SUITE_VERSION
from argus.models.chatml import CHAT_TEMPLATE, IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START
from argus.storage import upload_dir

Arch = Literal["qwen2", "qwen2_5_vl"]
# Names the recipe a tiny model was built by (tokenizer, sizes, pre-training) and the suite whose text its
# tokenizer learns from: part of the name of a built base model, so a change to either builds a new one
# instead of reusing one made the old way.
RECIPE = f"r3-suite{SUITE_VERSION}"

SPECIAL_TOKENS = ["<|endoftext|>", IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"]
ACTION_TOKENS = [
    "<think>",
    "</think>",
    "<code>",
    "</code>",
    "<tool_call>",
    "</tool_call>",
    "<answer>",
    "</answer>",
    "<tool_response>",
    "</tool_response>",
    "<image>",
]


def training_texts(seed: int = 0) -> list[str]:
    """The text the tokenizer learns its merges from: prompts, actions, observations, the syllables names
    are made of, numbers.

    No entity or region name is in it, not even a training one: a name the merges knew would be one
    token in training and several pieces in evaluation (where names are new), and a model that learned
    to copy one token would not copy the pieces. Every name is spelt in its syllables instead, trained or
    held out alike. Nothing of the eval split is read.
    """
    import re

    from argus.agent import prompts
    from argus.data.tasks import SYLLABLES, build_suite

    suite = build_suite(seed, sft_size=400, rl_size=0, eval_size=0)
    names = sorted({e.name for e in suite.entities} | {e.region for e in suite.entities}, key=len, reverse=True)
    # A name becomes one of its syllables' spellings, so the surrounding text keeps its shape.
    anonymous = re.compile("|".join(re.escape(n) for n in names), re.IGNORECASE)
    texts = [prompts.SYSTEM_PROMPT, prompts.COMPACT_SYSTEM_PROMPT] * 20
    for mini in suite.sft:
        texts.append(prompts.USER_PROMPT.format(question=mini.task.question))
        texts.extend(mini.gold)
        texts.append(prompts.code_observation(mini.task.answer + "\n", "", 0))
    texts.extend(e.document()["text"] for e in suite.train_entities)
    texts.extend(
        prompts.search_observation(
            f"A Google search for 'history of {e.name}' found 1 results:\n\n"
            f"## Web Results\n1. [{e.name}]({e.document()['url']})"
        )
        for e in suite.train_entities
    )
    texts = [anonymous.sub("Name", t) for t in texts]
    texts.extend(f"{s} {s.capitalize()} of {s.capitalize()}" for s in SYLLABLES for _ in range(30))
    # Every number chunk a pre-token can be (one to three digits), so each is a token of its own.
    texts.extend(str(n) for n in range(1000) for _ in range(3))
    texts.extend(f"{n:02d}" for n in range(100))
    texts.extend(f"{n:03d}" for n in range(100))
    return texts


# Qwen2's pre-tokenizer with Llama 3's numbers: digits in runs of one to three. With single digits
# (Qwen2's choice), copying a number is a chain of matches on ten symbols that repeat everywhere, and the
# miniature often copies a first digit and loses its place; a three-digit chunk is rarely ambiguous in a
# context (`benchmarks/sft_copy.py`: 0.65 against 0.54 of held-out trajectories replayed exactly).
PRETOKENIZE = "|".join(
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        r"[^\r\n\p{L}\p{N}]?\p{L}+",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    )
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ACTION_TOKENS])
    # The generic fast tokenizer, not Qwen2's class: transformers' Qwen2 tokenizer rebuilds Qwen2's own
    # pre-tokenizer when it loads, and the saved one (digit runs) must be what every loader gets.
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Text model sizes. `nano` is what tests train in seconds. `mini` is the quickstart's miniature: nano's
# width with two 64-wide heads instead of four 32-wide ones (measured with `benchmarks/sft_copy.py`: the
# wide heads learn the suite's copies where the narrow ones do not), and a copy pre-training (below).
# `small` is a wider, deeper model for machines with more than two cores.
SIZES: dict[str, dict[str, int]] = {
    "nano": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "mini": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}
Size = Literal["nano", "mini", "small"]
# The sizes whose base model is pre-trained to copy (see `pretrain_copying`).
COPY_PRETRAINED: frozenset[str] = frozenset({"mini", "small"})
PRETRAINING_RECORD = "argus_pretraining.json"


def _text_config(tokenizer: Any, size: Size = "nano") -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        **SIZES[size],
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build(arch: Arch, seed: int = 0, size: Size = "nano") -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor or None) for `arch`, randomly initialised from `seed`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer(training_texts(seed))
    torch.manual_seed(seed)
    if arch == "qwen2":
        text_model = Qwen2ForCausalLM(Qwen2Config(**_text_config(tokenizer, size), dtype="float32"))
        return text_model.eval(), tokenizer, None  # type: ignore[no-untyped-call]
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    text = _text_config(tokenizer, size)
    vl_config = Qwen2_5_VLConfig(
        text_config={
            **text,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        },
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=text["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
        dtype="float32",
    )
    # The PIL image processor (torchvision, which the default one needs, is CUDA-only from the registry
    # here); the trainer pairs it with the tokenizer, expanding <|image_pad|> per image grid itself.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    vl_model = Qwen2_5_VLForConditionalGeneration(vl_config)
    return vl_model.eval(), tokenizer, image_processor  # type: ignore[no-untyped-call]


@dataclass
class CopyPretraining:
    steps: int
    copy_accuracy: float
    seconds: float
    threshold: float
    reached: bool


def copy_batch(
    rng: random.Random, vocabulary: list[int], rows: int, length: int = 160
) -> tuple[list[list[int]], list[list[int]]]:
    """Rows of random tokens in which one random string recurs: `noise, S, noise, S, noise`. The labels
    are the second S after its first token (the first cannot be known; the rest can only be copied)."""
    ids, labels = [], []
    for _ in range(rows):
        span = rng.randrange(16, 65)
        string = [rng.choice(vocabulary) for _ in range(span)]
        head = [rng.choice(vocabulary) for _ in range(rng.randrange(0, 8))]
        gap = [rng.choice(vocabulary) for _ in range(rng.randrange(0, 16))]
        row = (head + string + gap + string)[:length]
        row += [rng.choice(vocabulary) for _ in range(length - len(row))]
        start = len(head) + span + len(gap)
        label = [-100] * length
        label[start + 1 : min(start + span, length)] = row[start + 1 : min(start + span, length)]
        ids.append(row)
        labels.append(label)
    return ids, labels


def pretrain_copying(
    model: Any,
    tokenizer: Any,
    *,
    seed: int = 0,
    threshold: float = 0.3,
    max_steps: int = 1500,
    rows: int = 16,
    lr: float = 3e-3,
    on_progress: Callable[[int, float], None] = lambda _step, _accuracy: None,
) -> CopyPretraining:
    """Teach a new model the one skill every pre-trained language model has and a tiny one trained on the
    suite alone learns last: continuing a string that occurred earlier in the context (an induction head).

    The corpus is random tokens of the vocabulary with a repeated random string in each row, nothing of
    the task suite: the model learns to copy, not what to copy, and its accuracy on the suite stays at
    zero (it has never seen the action format). Training stops as soon as the copy accuracy of a batch
    reaches `threshold`: the skill appears in a sudden phase change (for the `mini` model ~600 steps of
    near-chance loss, then from 0.03 to 0.98 within ~50 steps), and a model stopped at its onset takes to
    the suite's copies at once while keeping the room to learn everything else; one trained far past it
    copies well and is slow to learn the suite's other patterns (measured with `benchmarks/sft_copy.py`).
    Deterministic for a seed."""
    import torch

    rng = random.Random(f"copy-pretraining-{seed}")
    reserved = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(ACTION_TOKENS))
    vocabulary = [i for i in range(len(tokenizer)) if i not in reserved]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = 30
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    started = time.perf_counter()
    model.train()
    accuracy, step = 0.0, 0
    try:
        for step in range(1, max_steps + 1):
            ids, labels = copy_batch(rng, vocabulary, rows)
            inputs, targets = torch.tensor(ids), torch.tensor(labels)[:, 1:]
            logits = model(input_ids=inputs).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            scored = targets != -100
            accuracy = float((logits.argmax(-1)[scored] == targets[scored]).float().mean())
            on_progress(step, accuracy)
            if accuracy >= threshold:
                break
    finally:
        model.eval()
    return CopyPretraining(step, accuracy, time.perf_counter() - started, threshold, accuracy >= threshold)


def init_tiny(
    arch: Arch,
    out: str,
    *,
    seed: int = 0,
    size: Size = "nano",
    stack: StackSettings | None = None,
    on_progress: Callable[[int, float], None] = lambda _step, _accuracy: None,
) -> list[str]:
    """Build and save a tiny model to a local directory or an s3:// prefix; returns the written files.
    Sizes in `COPY_PRETRAINED` are pre-trained to copy first (`on_progress(step, copy accuracy)`)."""
    model, tokenizer, processor = build(arch, seed, size)
    pretraining = None
    if size in COPY_PRETRAINED:
        # The VL model pre-trains its language model: the vision tower has no copying to learn.
        pretraining = pretrain_copying(model, tokenizer, seed=seed, on_progress=on_progress)
        if not pretraining.reached:
            raise RuntimeError(
                f"the copy pre-training of the tiny {arch} ({size}) reached {pretraining.copy_accuracy:.3f} copy "
                f"accuracy in {pretraining.steps} steps, short of {pretraining.threshold}"
            )
    with tempfile.TemporaryDirectory(prefix="argus-tiny-") as tmp:
        local = Path(tmp)
        if pretraining is not None:
            (local / PRETRAINING_RECORD).write_text(json.dumps(asdict(pretraining), indent=1))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(local)
        tokenizer.save_pretrained(local)
        if processor is not None:
            processor.save_pretrained(local)
        return upload_dir(local, out, stack)


def built(
    arch: Arch,
    size: Size,
    seed: int,
    cache: Path,
    on_progress: Callable[[int, float], None] = lambda _step, _accuracy: None,
) -> Path:
    """The tiny model of (arch, size, seed) under `cache`, built on first use and reused after.

    Built in a sibling `.partial` directory and renamed into place whole: files are written one by one
    (`config.json` before the weights), so a build killed half way must not leave a directory that looks
    built; a leftover `.partial` is discarded and the build starts again. A lock file serialises builders
    (several homes, or a test suite, may share one cache), so a second one waits and then reuses. The
    recipe's version is in the name: a model built by an older recipe (tokenizer, pre-training) is never
    taken for today's. Building is deterministic for a seed, so sharing one build changes nothing."""
    path = cache / f"tiny-{arch}-{size}-seed{seed}-{RECIPE}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").exists():
            partial = path.with_name(path.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            init_tiny(arch, str(partial), seed=seed, size=size, on_progress=on_progress)
            shutil.rmtree(path, ignore_errors=True)  # an incomplete directory from before this rule
            os.replace(partial, path)
    return path
