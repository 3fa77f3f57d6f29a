"""Fault injection: a crash at a named point of a write path, for the reliability tests.

`ARGUS_FAULT=<point>` in a program's environment makes it die exactly there, as `kill -9` would
(`os._exit(137)`: no handler, no flush, no cleanup), so a test strikes inside a checkpoint upload or
between an object's data and its record by construction rather than by timing. Points:

- `checkpoint-upload:step-NNNNNNNN`: a trainer rank, after the first file of that step's upload;
- `checkpoint-commit:step-NNNNNNNN`: rank 0, after the step's files are in place, before its manifest;
- `s3-after-data`, `s3-after-meta`: the local S3 endpoint, inside an object write.

Unset (always, outside the tests), `fault` is one environment lookup.
"""

from __future__ import annotations

import os

ENV = "ARGUS_FAULT"
EXIT_CODE = 137  # what a SIGKILLed process reports


def fault(point: str) -> None:
    if os.environ.get(ENV) == point:
        os._exit(EXIT_CODE)
