"""An Argus process that owns a training job and has started one process meant to outlive it; the
test SIGKILLs it (no cleanup runs) and checks what is left."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from argus import supervision
from argus.backends.base import TrainingJob
from argus.backends.local.backend import LocalBackend
from argus.config import StackSettings


def main() -> None:
    backend = LocalBackend(StackSettings(home=Path(sys.argv[1])))
    job = TrainingJob(name="owned", module="tests.programs.env_probe", config={"sleep_s": 600}, nproc_per_node=2)
    backend.submit(job)
    _popen, kept = supervision.spawn(["sleep", "600"])  # like a production deployment: not owned
    log = backend.job_dir("owned") / "train.log"
    while '"event": "start"' not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    print(json.dumps({"kept": kept.pid}), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
