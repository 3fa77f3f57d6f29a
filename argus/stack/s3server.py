"""The local S3 endpoint: moto's S3 server, made durable by mirroring every bucket to a directory.

moto keeps objects in memory only, which would lose every MLflow artifact and checkpoint when the
stack restarts while MLflow's sqlite store still points at them. This program serves moto's own WSGI
app and, after each successful mutating request, mirrors the touched bucket to disk before the client
sees the answer. At start it restores the mirror.

The metadata file is each object's commit record, and it names the data file it goes with. A write puts
the data under a new name (its content hash), then replaces the metadata (temp file, fsync, rename),
and only then removes the data the old metadata named. So a crash at any point of an overwrite leaves
either the old record with the old data or the new record with the new data, both complete: restore
serves the last acknowledged version or the new one, never nothing. Start-up removes what a crash left
behind: temp files, and data files no record names.

On a cluster this is replaced by MinIO or S3; nothing else in Argus knows the difference.

    python -m argus.stack.s3server --host 127.0.0.1 --port 9000 --data-dir .argus/s3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.s3.models import S3Backend, s3_backends
from werkzeug.serving import make_server

from argus.faults import fault

log = logging.getLogger("argus.s3server")

_MUTATING = {"PUT", "POST", "DELETE"}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class DiskMirror:
    """`root/<bucket>/<sha256(key)>.meta.json`, the commit record, naming its data file
    `<sha256(key)>.<sha256(data)[:16]>.data` (a mirror written before records named their data has
    `<sha256(key)>.data`, which restore still reads)."""

    def __init__(self, root: Path, region: str):
        self.root = root
        self.region = region
        self.root.mkdir(parents=True, exist_ok=True)
        self._etags: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _backend_for(bucket: str) -> S3Backend | None:
        owner = s3_backends.bucket_accounts.get(bucket)
        if owner is None:
            return None
        partition, account = owner
        return s3_backends[account][partition]

    def _meta_path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / f"{hashlib.sha256(key.encode()).hexdigest()}.meta.json"

    @staticmethod
    def _data_path(meta_path: Path, meta: dict[str, Any]) -> Path:
        name = meta.get("data") or meta_path.name.replace(".meta.json", ".data")
        return meta_path.with_name(name)

    def _read_meta(self, meta_path: Path) -> dict[str, Any] | None:
        try:
            meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        return meta

    def _commit(self, bucket: str, key: str, value: bytes, metadata: dict[str, Any]) -> None:
        meta_path = self._meta_path(bucket, key)
        old = self._read_meta(meta_path)
        sha = hashlib.sha256(value).hexdigest()
        data_name = f"{meta_path.name.removesuffix('.meta.json')}.{sha[:16]}.data"
        _write_atomic(meta_path.with_name(data_name), value)  # 1. the new data, under its own name
        fault("s3-after-data")
        meta = {"key": key, "sha256": sha, "data": data_name, "metadata": metadata}
        _write_atomic(meta_path, json.dumps(meta).encode())  # 2. the commit: the record names it
        fault("s3-after-meta")
        if old is not None:  # 3. the old data, once nothing names it
            previous = self._data_path(meta_path, old)
            if previous.name != data_name:
                previous.unlink(missing_ok=True)

    def sync_bucket(self, bucket: str) -> None:
        with self._lock:
            backend = self._backend_for(bucket)
            bucket_dir = self.root / bucket
            if backend is None or bucket not in backend.buckets:
                if bucket_dir.exists():
                    shutil.rmtree(bucket_dir)
                self._etags.pop(bucket, None)
                return
            bucket_dir.mkdir(exist_ok=True)
            known = self._etags.setdefault(bucket, {})
            live = {name: fake for name, fake in backend.buckets[bucket].keys.items() if fake is not None}
            for name, fake in live.items():
                etag = str(fake.etag)
                if known.get(name) == etag:
                    continue
                self._commit(bucket, name, fake.value, dict(fake.metadata))
                known[name] = etag
            for name in set(known) - set(live):
                meta_path = self._meta_path(bucket, name)
                meta = self._read_meta(meta_path)
                meta_path.unlink(missing_ok=True)  # the record first: no record, no object
                if meta is not None:
                    self._data_path(meta_path, meta).unlink(missing_ok=True)
                del known[name]

    def restore(self) -> int:
        """Load the mirror into moto; objects whose data does not match their meta are skipped. Temp files
        and data files that no record names (what a crash mid-write leaves) are removed first."""
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        restored = 0
        for bucket_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            bucket = bucket_dir.name
            backend.create_bucket(bucket, self.region)
            known = self._etags.setdefault(bucket, {})
            records = {p: self._read_meta(p) for p in bucket_dir.glob("*.meta.json")}
            named = {self._data_path(p, m).name for p, m in records.items() if m is not None}
            for stray in [*bucket_dir.glob(".*.tmp"), *(p for p in bucket_dir.glob("*.data") if p.name not in named)]:
                log.info("removing %s, left by an interrupted write", stray.name)
                stray.unlink(missing_ok=True)
            for meta_path, meta in records.items():
                try:
                    if meta is None:
                        raise ValueError("unreadable record")
                    value = self._data_path(meta_path, meta).read_bytes()
                except (OSError, ValueError) as exc:
                    log.warning("skipping unreadable object %s: %s", meta_path, exc)
                    continue
                if hashlib.sha256(value).hexdigest() != meta["sha256"]:
                    log.warning("skipping %s/%s: data does not match its checksum", bucket, meta["key"])
                    continue
                fake = backend.put_object(bucket, meta["key"], value, disable_notification=True)
                fake.set_metadata(meta["metadata"], replace=True)
                known[meta["key"]] = str(fake.etag)
                restored += 1
        return restored


class MirrorMiddleware:
    """WSGI middleware: after a successful mutating request on a bucket, mirror that bucket."""

    def __init__(self, app: Callable[..., Iterable[bytes]], mirror: DiskMirror):
        self.app = app
        self.mirror = mirror

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in _MUTATING:
            return self.app(environ, start_response)
        status_holder: list[str] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status_holder.append(status)
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        # moto applies the change while building the response; materialise it before syncing so the
        # client is answered only once the change is on disk.
        body = list(self.app(environ, capture))
        bucket = unquote(environ.get("PATH_INFO", "/").lstrip("/").split("/", 1)[0])
        if bucket and bucket != "moto-api" and status_holder and status_holder[0][:1] == "2":
            self.mirror.sync_bucket(bucket)
        return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    mirror = DiskMirror(args.data_dir, args.region)
    log.info("restored %d objects from %s", mirror.restore(), args.data_dir)
    app = MirrorMiddleware(DomainDispatcherApplication(create_backend_app), mirror)
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving S3 on http://%s:%d", args.host, args.port)
    server.serve_forever()


if __name__ == "__main__":
    main()
