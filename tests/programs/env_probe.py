"""A training program for backend tests: reports the env contract it was started with as progress
events, then exits the way its job config says (succeed, fail, or fail until a marker file exists)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

CONTRACT = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "PET_NNODES", "PET_NPROC_PER_NODE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    config = json.loads(Path(parser.parse_args().config).read_text())
    rank = int(os.environ["RANK"])
    if rank == 0:
        print("ARGUS " + json.dumps({"event": "start", "env": {k: os.environ.get(k) for k in CONTRACT}}), flush=True)
    time.sleep(float(config.get("sleep_s", 0)))
    marker = Path(config["marker"]) if config.get("marker") else None
    if marker is not None and not marker.exists():
        marker.write_text("first attempt failed")
        sys.exit(3)
    if config.get("exit_code"):
        sys.exit(int(config["exit_code"]))
    if rank == 0:
        print("ARGUS " + json.dumps({"event": "exported", "uri": "done"}), flush=True)


if __name__ == "__main__":
    main()
