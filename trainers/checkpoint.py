"""Checkpoints in an object-store prefix that a crash can never leave half-counted.

Layout under the prefix (local directory or s3://):

    step-00000040.partial-<nonce>/...   being written (every rank uploads its own files)
    step-00000040/...                   promoted copy
    step-00000040/manifest.json         written last: step, sha256 and size of every file

Only a step directory with a manifest whose files all match counts as a checkpoint. A partial
prefix, a missing manifest or a mismatching hash is skipped with a warning (and partial prefixes are
removed at the next save). The newest K complete checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argus.config import StackSettings
from argus.faults import fault
from argus.storage import S3Uri, is_s3, join_uri, read_uri, s3_client, write_uri

log = logging.getLogger("argus.checkpoint")
_STEP = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    step: int
    uri: str
    manifest: dict[str, Any]


class CheckpointStore:
    def __init__(self, prefix: str, settings: StackSettings | None = None):
        self.prefix = prefix.rstrip("/")
        self.settings = settings or StackSettings()

    # -- listing -------------------------------------------------------------------------------------

    def _children(self) -> list[str]:
        """Names directly under the prefix."""
        if is_s3(self.prefix):
            ref = S3Uri.parse(self.prefix)
            client = s3_client(self.settings)
            names: set[str] = set()
            base = ref.key.rstrip("/") + "/" if ref.key else ""
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=ref.bucket, Prefix=base, Delimiter="/"):
                names.update(p["Prefix"][len(base) :].rstrip("/") for p in page.get("CommonPrefixes", []))
            return sorted(names)
        root = Path(self.prefix)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def _files(self, uri: str) -> list[str]:
        """Relative paths of every file under `uri`."""
        if is_s3(uri):
            ref = S3Uri.parse(uri)
            base = ref.key.rstrip("/") + "/"
            client = s3_client(self.settings)
            return sorted(
                obj["Key"][len(base) :]
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=ref.bucket, Prefix=base)
                for obj in page.get("Contents", [])
            )
        root = Path(uri)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def verify(self, step_name: str) -> Checkpoint | None:
        uri = join_uri(self.prefix, step_name)
        try:
            manifest = json.loads(read_uri(join_uri(uri, MANIFEST), self.settings))
        except (OSError, ValueError):
            log.warning("skipping checkpoint %s: no readable manifest (incomplete write)", uri)
            return None
        for rel, meta in manifest["files"].items():
            try:
                data = read_uri(join_uri(uri, rel), self.settings)
            except OSError:
                log.warning("skipping checkpoint %s: %s is missing", uri, rel)
                return None
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                log.warning("skipping checkpoint %s: %s does not match its sha256", uri, rel)
                return None
        return Checkpoint(step=int(manifest["step"]), uri=uri, manifest=manifest)

    def complete(self) -> list[Checkpoint]:
        """Every complete checkpoint, oldest first."""
        out = []
        for name in self._children():
            if _STEP.match(name) and (ckpt := self.verify(name)) is not None:
                out.append(ckpt)
        return sorted(out, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint; incomplete newer ones are skipped with a warning."""
        for name in reversed(self._children()):
            if _STEP.match(name) and (ckpt := self.verify(name)) is not None:
                return ckpt
        return None

    # -- writing ---------------------------------------------------------------------------------------

    def partial_uri(self, step: int, nonce: str) -> str:
        return join_uri(self.prefix, f"step-{step:08d}.partial-{nonce}")

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_hex(4)

    def upload(self, local: Path, dest: str) -> dict[str, dict[str, Any]]:
        """Upload one rank's files; returns their hashes for the manifest."""
        entries = {}
        step_name = dest.rstrip("/").rsplit("/", 1)[-1].split(".partial-")[0]
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            write_uri(join_uri(dest, rel), path.read_bytes(), self.settings)
            entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            fault(f"checkpoint-upload:{step_name}")
        return entries

    def commit(
        self, step: int, nonce: str, files: dict[str, dict[str, Any]], meta: dict[str, Any], keep_last: int
    ) -> Checkpoint:
        """Promote the partial prefix to step-N/, write the manifest last, prune old and partial ones."""
        partial = self.partial_uri(step, nonce)
        final = join_uri(self.prefix, f"step-{step:08d}")
        self._delete(final)  # a leftover of a crash at this very step
        self._move(partial, final)
        fault(f"checkpoint-commit:step-{step:08d}")
        manifest = {"step": step, "files": files, **meta}
        write_uri(join_uri(final, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode(), self.settings)
        for name in self._children():
            if ".partial-" in name:
                self._delete(join_uri(self.prefix, name))
        complete = self.complete()
        for old in complete[: max(0, len(complete) - keep_last)]:
            self._delete(old.uri)
        return Checkpoint(step=step, uri=final, manifest=manifest)

    def download(self, ckpt: Checkpoint, local: Path, only: set[str] | None = None) -> Path:
        for rel in ckpt.manifest["files"]:
            if only is not None and rel not in only:
                continue
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_uri(join_uri(ckpt.uri, rel), self.settings))
        return local

    def _move(self, src: str, dst: str) -> None:
        if not is_s3(src):
            os.replace(src, dst)
            return
        client = s3_client(self.settings)
        s, d = S3Uri.parse(src), S3Uri.parse(dst)
        for rel in self._files(src):
            client.copy_object(
                Bucket=d.bucket,
                Key=f"{d.key.rstrip('/')}/{rel}",
                CopySource={"Bucket": s.bucket, "Key": f"{s.key.rstrip('/')}/{rel}"},
            )
        self._delete(src)

    def _delete(self, uri: str) -> None:
        if not is_s3(uri):
            shutil.rmtree(uri, ignore_errors=True)
            return
        ref = S3Uri.parse(uri)
        client = s3_client(self.settings)
        keys = [f"{ref.key.rstrip('/')}/{rel}" for rel in self._files(uri)]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=ref.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
