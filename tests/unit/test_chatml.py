"""One ChatML layout: the served template, the in-process render, the SFT encoder and the RL encoding agree."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from argus.agent import prompts
from argus.data.formats import SFTExample
from argus.models import chatml
from argus.models.tiny import build
from trainers.sft.data import IGNORE, Encoder


def test_the_served_template_renders_what_the_trainers_encode() -> None:
    _model, tok, _ = build("qwen2", seed=0)
    messages = [
        *prompts.opening("compact", "What is 17 * 23?"),
        {"role": "assistant", "content": "<code>print(17 * 23)</code>"},
        {"role": "user", "content": "<tool_response>391</tool_response>"},
    ]
    served = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert served == chatml.render(messages)
    # Piecewise ids (head, body, tail per message) are the whole text's ids: no token crosses a boundary.
    whole = tok(chatml.render(messages, generation_prompt=False), add_special_tokens=False)["input_ids"]
    assert chatml.encode(tok, messages) == whole


def test_images_expand_to_their_vision_tokens_as_the_sft_encoder_expands_them(tmp_path: Path) -> None:
    _model, tok, processor = build("qwen2_5_vl", seed=0)
    paths = []
    for i, size in enumerate([(56, 56), (84, 112)]):
        buf = io.BytesIO()
        Image.new("RGB", size, (40 * i, 90, 200)).save(buf, format="PNG")
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(buf.getvalue())
    messages = [
        *prompts.opening("compact", "How many shapes?"),  # the opening holds the task image
        {"role": "assistant", "content": "<code>crop()</code>"},
        {"role": "user", "content": "<tool_response><image></tool_response>"},
        {"role": "assistant", "content": "<answer>3</answer>"},
    ]
    example = SFTExample(messages=messages, images=[str(p) for p in paths])
    encoded = Encoder(tok, processor, max_seq_len=4096).encode(example, "test")
    assert encoded is not None and encoded.image_grid_thw is not None
    pads = chatml.image_pads(encoded.image_grid_thw, int(processor.merge_size) ** 2)
    assert pads == [int(g.prod()) // 4 for g in encoded.image_grid_thw] and all(n > 0 for n in pads)
    assert chatml.encode(tok, messages, iter(pads)) == encoded.input_ids
    pad_id = tok.convert_tokens_to_ids(chatml.IMAGE_PAD)
    assert encoded.input_ids.count(pad_id) == sum(pads)
    # Vision tokens are inputs, never targets.
    assert all(label == IGNORE for ids, label in zip(encoded.input_ids, encoded.labels, strict=True) if ids == pad_id)
    # A text model keeps the placeholder as text.
    assert chatml.IMAGE in tok.decode(chatml.encode(tok, messages))
