"""Tiny Qwen2 and Qwen2.5-VL models built from configs, with a locally trained tokenizer.

Nothing is downloaded: the BPE tokenizer is trained on the DeepEyesV2 prompts and the miniature suite's
text, gets Qwen's chat special tokens and chat template, and keeps the action tags (`<think>`,
`<code>`, `<tool_call>`, `<answer>`, ...) as single tokens so a tiny model can learn the format. The
models are randomly initialised (seeded) and saved with `save_pretrained`, the layout every real
checkpoint has, so the same loading code serves a 7B model from the hub or the object store.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from argus.config import StackSettings
from argus.storage import upload_dir

Arch = Literal["qwen2", "qwen2_5_vl"]

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
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

# Qwen2-VL's ChatML template: image parts become vision placeholders, text parts pass through.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def training_texts(seed: int = 0) -> list[str]:
    """The text the tokenizer learns its merges from: prompts, actions, observations, corpus.

    Training split only: the merges must not know the eval split's questions or its entities' names
    (a held-out name is then spelt in the syllable pieces every training name is made of).
    """
    from argus.agent import prompts
    from argus.data.tasks import build_suite

    suite = build_suite(seed, sft_size=400, rl_size=0, eval_size=0)
    train_names = {e.name for e in suite.train_entities}
    texts = [prompts.SYSTEM_PROMPT, prompts.COMPACT_SYSTEM_PROMPT] * 20
    for mini in suite.sft:
        texts.append(prompts.USER_PROMPT.format(question=mini.task.question))
        texts.extend(mini.gold)
        texts.append(prompts.code_observation(mini.task.answer + "\n", "", 0))
    texts.extend(e.document()["text"] for e in suite.entities if e.name in train_names)
    texts.extend(
        prompts.search_observation(
            f"A Google search for '{e.name} founded' found 5 results:\n\n"
            f"## Web Results\n1. [{e.name}]({e.document()['url']})"
        )
        for e in suite.entities
        if e.name in train_names
    )
    texts.extend(str(n) for n in range(0, 2000, 7))
    return texts


QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    tok = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenizer: digits are single tokens, so copying a number out of a tool result is
    # the same small skill for every number (with merged digit runs, each number is a rare token).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated"),
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
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Text model sizes. `nano` (~0.9M parameters) is what tests train in seconds; `small` is the quickstart's
# miniature, sized to learn the suite's tool use in a few minutes on 2 CPU cores.
SIZES: dict[str, dict[str, int]] = {
    "nano": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8},
}
Size = Literal["nano", "small"]


def _text_config(tokenizer: Any, size: Size = "nano") -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        **SIZES[size],
        num_key_value_heads=2,
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


def init_tiny(
    arch: Arch, out: str, *, seed: int = 0, size: Size = "nano", stack: StackSettings | None = None
) -> list[str]:
    """Build and save a tiny model to a local directory or an s3:// prefix; returns the written files."""
    model, tokenizer, processor = build(arch, seed, size)
    with tempfile.TemporaryDirectory(prefix="argus-tiny-") as tmp:
        local = Path(tmp)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(local)
        tokenizer.save_pretrained(local)
        if processor is not None:
            processor.save_pretrained(local)
        return upload_dir(local, out, stack)
