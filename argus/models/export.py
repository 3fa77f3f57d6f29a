"""What an Argus trainer records beside a model it exports (`argus_export.json`), read back by the
stages and trainers that start from that model."""

from __future__ import annotations

import json
from typing import Any

from argus.config import StackSettings
from argus.storage import join_uri, read_uri

EXPORT_RECORD = "argus_export.json"


def export_record(model_uri: str, settings: StackSettings | None = None) -> dict[str, Any] | None:
    """The record of an Argus export, or None for a model no Argus trainer wrote (a base model)."""
    try:
        record: dict[str, Any] = json.loads(read_uri(join_uri(model_uri, EXPORT_RECORD), settings))
    except FileNotFoundError:
        return None
    return record


def training_prompt(model_uri: str, settings: StackSettings | None = None) -> str | None:
    """The prompt the model was trained with (None: not an Argus export, e.g. a base model)."""
    record = export_record(model_uri, settings)
    return str(record["prompt"]) if record and "prompt" in record else None


def prompt_mismatch(model_uri: str, prompt: str, use: str, settings: StackSettings | None = None) -> str | None:
    """Why `model_uri` must not be `use`d (evaluated, trained further) with `prompt`, or None."""
    trained = training_prompt(model_uri, settings)
    if trained is not None and trained != prompt:
        return (
            f"{model_uri} was trained with the {trained!r} prompt and would be {use} with the {prompt!r} "
            "prompt: a model answers to the prompt it learned (set the spec's `prompt` to the training one)"
        )
    return None
