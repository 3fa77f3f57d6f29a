"""SFT examples as model inputs: ChatML tokens (`argus.models.chatml`), labels on assistant tokens only,
images for VL models.

Each message becomes `<|im_start|>{role}\\n{content}<|im_end|>\\n`; only an assistant message's content
and its closing `<|im_end|>` carry labels. Tool observations are user turns, so they are masked out:
the model learns to act, not to predict what the tools answer. For a VL model every `<image>` becomes
`<|vision_start|>` + one `<|image_pad|>` per merged patch + `<|vision_end|>`, with the pixel values and
grid of that image from the (PIL) image processor.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from argus.agent.prompts import prompt_of
from argus.config import StackSettings
from argus.data.formats import DataFormatError, SFTExample
from argus.models import chatml
from argus.storage import read_uri

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class Encoder:
    def __init__(
        self, tokenizer: Any, image_processor: Any | None, max_seq_len: int, settings: StackSettings | None = None
    ):
        self.tok = tokenizer
        self.max_seq_len = max_seq_len
        self.settings = settings
        self.vision = chatml.Vision(image_processor) if image_processor is not None else None

    def _ids(self, text: str) -> list[int]:
        ids: list[int] = self.tok(text, add_special_tokens=False)["input_ids"]
        return ids

    def _load_images(self, example: SFTExample, where: str) -> list[Image.Image]:
        images = []
        for path in example.images:
            try:
                images.append(Image.open(io.BytesIO(read_uri(path, self.settings))).convert("RGB"))
            except (OSError, ValueError) as exc:
                raise DataFormatError(f"{where}: image {path} cannot be loaded: {exc}") from exc
        return images

    def encode(self, example: SFTExample, where: str) -> Encoded | None:
        """None when the example is longer than max_seq_len (it is dropped, not cut mid-turn)."""
        pixel_values = grid = None
        pad_counts: list[int] = []
        if self.vision is not None and example.images:
            media, pad_counts = self.vision.process(self._load_images(example, where))
            pixel_values, grid = media.pixel_values, media.image_grid_thw
        input_ids: list[int] = []
        labels: list[int] = []
        pads = iter(pad_counts)
        for msg in example.messages:
            content = chatml.expand_images(msg["content"], pads) if pad_counts else msg["content"]
            head, body, tail = chatml.parts(self.tok, msg["role"], content)
            input_ids += head + body + tail
            if msg["role"] == "assistant":
                labels += [IGNORE] * len(head) + body + [IGNORE] * len(tail)
            else:
                labels += [IGNORE] * (len(head) + len(body) + len(tail))
        if len(input_ids) > self.max_seq_len:
            return None
        return Encoded(input_ids, labels, pixel_values, grid)


def check_prompt(examples: list[SFTExample], prompt: str, where: str) -> None:
    """Refuse a dataset whose conversations open with one of Argus's prompts other than the job's: the
    model would learn one prompt and be evaluated (and rolled out) with another."""
    for i, example in enumerate(examples):
        first = example.messages[0] if example.messages else {}
        used = prompt_of(str(first.get("content", ""))) if first.get("role") == "system" else None
        if used is not None and used != prompt:
            raise DataFormatError(
                f"{where}: example {i} opens with the {used!r} prompt, but the job trains with the {prompt!r} "
                "prompt (the spec's `prompt`): generate the data with the same prompt"
            )


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; images of the whole micro-batch are concatenated in order."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [e.pixel_values for e in batch if e.pixel_values is not None]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.cat([e.image_grid_thw for e in batch if e.image_grid_thw is not None])
    return out


class Schedule:
    """Which examples each rank reads, step by step: a seeded permutation per epoch.

    The position is one integer (samples consumed by all ranks together), which is all a checkpoint
    needs to resume the data exactly where it stopped.

    With `lengths`, rounds are length-bucketed: each window of `bucket` rounds of the shuffled order is
    sorted by length before it is cut into rounds, and the rounds are shuffled again, so a micro-batch
    holds examples of similar length (little padding: every rank pads to its longest) while the order
    stays random at the scale of an epoch.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        world: int,
        rank: int,
        micro_batch: int,
        lengths: list[int] | None = None,
        bucket: int = 16,
    ):
        if n < world * micro_batch:
            raise DataFormatError(f"{n} usable examples cannot fill one micro-batch of {micro_batch} on {world} ranks")
        self.n, self.seed, self.world, self.rank, self.micro_batch = n, seed, world, rank, micro_batch
        self.per_round = world * micro_batch
        self.rounds_per_epoch = n // self.per_round  # the remainder of an epoch is dropped, like drop_last
        self.lengths = lengths
        self.bucket = bucket
        self._cached: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        order = list(range(self.n))
        rng = random.Random(f"{self.seed}-{epoch}")
        rng.shuffle(order)
        if self.lengths is not None:
            used = order[: self.rounds_per_epoch * self.per_round]
            window = self.per_round * self.bucket
            rounds: list[list[int]] = []
            for start in range(0, len(used), window):
                chunk = sorted(used[start : start + window], key=lambda i: self.lengths[i])  # type: ignore[index]
                rounds += [chunk[k : k + self.per_round] for k in range(0, len(chunk), self.per_round)]
            rng.shuffle(rounds)
            # Within a round, rank r takes the r-th slice: alternate so ranks get similar lengths.
            order = [i for r in rounds for i in (r[0::2] + r[1::2] if self.world == 2 else r)]
        self._cached = (epoch, order)
        return order

    def micro_batch_at(self, position: int) -> list[int]:
        """Indices for this rank at global `position` (counted in micro-batch rounds)."""
        epoch, round_in_epoch = divmod(position, self.rounds_per_epoch)
        order = self._order(epoch)
        start = round_in_epoch * self.per_round + self.rank * self.micro_batch
        return order[start : start + self.micro_batch]
