"""ChatML with Qwen2-VL's vision placeholders: the one token layout that SFT trains on, RL rolls out,
the in-process policy renders and the served chat template produces.

A message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`. Its content may hold `<image>` placeholders
(the data format's); for a vision-language model each becomes `<|vision_start|>`, one `<|image_pad|>`
per merged patch of that image, and `<|vision_end|>`, which the model's forward pass replaces with the
image's vision embeddings. A text model keeps `<image>` as text.

The three pieces of a message are tokenised on their own (`parts`): the head `<|im_start|>role\\n`, the
body `content<|im_end|>` (what an assistant turn is trained to produce and what a rollout samples), and
the newline. Tokenising the pieces apart is what lets a rollout append an observation to ids it sampled
and get the same ids the SFT encoder gives the whole conversation: nothing merges across a boundary.
Everything that writes this layout is here, so the trainers and the served template cannot drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from argus.data.formats import IMAGE_TOKEN as IMAGE  # the data format's placeholder

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
VL_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")  # `model_type`s whose forward takes these images

# What vLLM serves with and `apply_chat_template` renders (OpenAI messages, whose image parts become one
# placeholder that the processor expands): the same layout, with Qwen2-VL's default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{{% endif %}}"
    f"{IM_START}{{{{ message['role'] }}}}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    f"{VISION_START}{IMAGE_PAD}{VISION_END}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    f"{{% endfor %}}{{% endif %}}{IM_END}\n"
    "{% endfor %}"
    f"{{% if add_generation_prompt %}}{IM_START}assistant\n{{% endif %}}"
)


def render(messages: Iterable[Mapping[str, str]], *, generation_prompt: bool = True) -> str:
    """The conversation as text, opening the assistant's next turn when `generation_prompt`."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if generation_prompt else "")


def expand_images(content: str, pads: Iterator[int]) -> str:
    """Each `<image>` of `content` as its vision placeholder, taking its pad count from `pads` in order."""
    pieces = content.split(IMAGE)
    out = pieces[0]
    for piece in pieces[1:]:
        out += VISION_START + IMAGE_PAD * next(pads) + VISION_END + piece
    return out


def image_pads(grid_thw: Any, merge: int) -> list[int]:
    """Vision tokens per image: its patches (t x h x w of the processor's `image_grid_thw`) over the
    patches merged into one token (Qwen2-VL: 2 x 2)."""
    return [int(g.prod()) // merge for g in grid_thw]


def parts(tokenizer: Any, role: str, content: str) -> tuple[list[int], list[int], list[int]]:
    """One message as (head, body, tail) ids; see the module's docstring."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return ids(f"{IM_START}{role}\n"), ids(f"{content}{IM_END}"), ids("\n")


def encode(tokenizer: Any, messages: Sequence[Mapping[str, str]], pads: Iterator[int] | None = None) -> list[int]:
    """Messages in the layout, each on its own; `pads` (one count per `<image>`, in order) for a VL model."""
    return [
        i
        for m in messages
        for part in parts(tokenizer, m["role"], expand_images(m["content"], pads) if pads else m["content"])
        for i in part
    ]


@dataclass
class Media:
    """The images of one conversation as a vision-language model takes them, in order: the pixel rows of
    all its images (`pixel_values`, [patches, channels x patch size]) and each image's patch grid
    (`image_grid_thw`, [images, 3]). Concatenating the media of several rows, in row order, is a batch's."""

    pixel_values: Any
    image_grid_thw: Any

    @staticmethod
    def join(parts: Sequence[Media | None]) -> Media | None:
        import torch

        present = [p for p in parts if p is not None]
        if not present:
            return None
        return Media(torch.cat([p.pixel_values for p in present]), torch.cat([p.image_grid_thw for p in present]))

    def inputs(self) -> dict[str, Any]:
        return {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}


class Vision:
    """A VL model's image processor (Qwen2-VL's), and what its output means for the token layout."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.merge = int(getattr(processor, "merge_size", 2)) ** 2

    def process(self, images: Sequence[Any]) -> tuple[Media, list[int]]:
        """(media, vision tokens per image) of PIL images or encoded image bytes."""
        import io

        from PIL import Image

        pil = [Image.open(io.BytesIO(i)).convert("RGB") if isinstance(i, bytes) else i for i in images]
        out = self.processor(images=pil, return_tensors="pt")
        media = Media(out["pixel_values"], out["image_grid_thw"])
        return media, image_pads(media.image_grid_thw, self.merge)
