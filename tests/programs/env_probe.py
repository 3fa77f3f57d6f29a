"""A training program for backend tests: writes the env contract it was started with to the config's
`report` file and says so with a progress event, then exits the way its job config says (succeed,
fail, or fail until a marker file exists)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from argus import events

CONTRACT = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "PET_NNODES", "PET_NPROC_PER_NODE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    config = json.loads(Path(parser.parse_args().config).read_text())
    rank = int(os.environ["RANK"])
    if rank == 0:
        if config.get("report"):
            Path(config["report"]).write_text(json.dumps({k: os.environ.get(k) for k in CONTRACT}))
        events.emit(events.Start(step=0, total=1, mlflow_run_id="none"))
    time.sleep(float(config.get("sleep_s", 0)))
    marker = Path(config["marker"]) if config.get("marker") else None
    if marker is not None and not marker.exists():
        marker.write_text("first attempt failed")
        sys.exit(3)
    if config.get("exit_code"):
        sys.exit(int(config["exit_code"]))
    if rank == 0:
        events.emit(events.Exported(uri="done", step=1))


if __name__ == "__main__":
    main()
