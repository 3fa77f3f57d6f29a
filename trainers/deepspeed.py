"""DeepSpeed as every Argus trainer sets it up: where its JIT-built ops live, and the job's config."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from argus.config import RLSpec, SFTSpec, StackSettings
from argus.storage import read_uri


def torch_extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops live: inside the virtualenv whose torch they link against. (One
    cache shared by several checkouts made each rebuild the ops for its own venv paths: 30-45 s per op
    on the first training job of a run, measured.) `scripts/setup.sh` prebuilds them there."""
    return Path(sys.prefix) / "torch_extensions"


def deepspeed_config(spec: SFTSpec | RLSpec, settings: StackSettings, world_size: int = 1) -> dict[str, Any]:
    """The spec's own DeepSpeed json when it names one, else the generated config for this device."""
    import torch

    if spec.deepspeed.config:
        user: dict[str, Any] = json.loads(read_uri(spec.deepspeed.config, settings))
        return user
    cuda = torch.cuda.is_available()
    return spec.deepspeed_config(cuda=cuda, bf16_ok=not cuda or torch.cuda.is_bf16_supported(), world_size=world_size)
