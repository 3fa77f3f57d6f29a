"""Object storage: one S3 client factory for every part of Argus (moto locally, MinIO or S3 on clusters)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from argus.config import StackSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/?(?P<key>.*)$")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        match = _S3_URI.match(uri)
        if not match:
            raise ValueError(f"not an s3:// URI: {uri!r}")
        return cls(match["bucket"], match["key"])

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def s3_client(settings: StackSettings, *, timeout_s: float = 10.0) -> S3Client:
    """A client for the settings' object store. Clients are made once per endpoint and credentials and
    shared (boto3 clients are thread-safe): making one costs ~20 ms, which a write per file paid before,
    a minute over the quickstart's 3,500 data files."""
    return _client(settings.s3_url, settings.s3_access_key, settings.s3_secret_key, settings.s3_region, timeout_s)


@functools.lru_cache(maxsize=16)
def _client(url: str, key: str, secret: str, region: str, timeout_s: float) -> S3Client:
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=region,
        config=BotoConfig(
            # Path-style works with moto, MinIO and S3 alike; virtual hosts need DNS we do not have locally.
            s3={"addressing_style": "path"},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


def ensure_buckets(settings: StackSettings) -> list[str]:
    """Create the buckets Argus uses; returns the ones that were missing."""
    client = s3_client(settings)
    created = []
    for bucket in settings.buckets:
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            client.create_bucket(Bucket=bucket)
            created.append(bucket)
    return created


def s3_healthy(settings: StackSettings) -> bool:
    try:
        s3_client(settings, timeout_s=2.0).list_buckets()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not healthy", the caller reports it
        return False


# -- URIs: one way to read and write a local path or an s3:// object ------------------------------------


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def join_uri(base: str | Path, *parts: str) -> str:
    """`base` and relative `parts` joined with '/' (for s3://) or as paths (for local)."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).joinpath(*parts))


def read_uri(uri: str | Path, settings: StackSettings | None = None) -> bytes:
    if is_s3(uri):
        ref = S3Uri.parse(str(uri))
        client = s3_client(settings or StackSettings())
        try:
            return client.get_object(Bucket=ref.bucket, Key=ref.key)["Body"].read()
        except ClientError as exc:
            raise FileNotFoundError(f"{uri}: {exc.response.get('Error', {}).get('Code', 'error')}") from exc
    return Path(uri).read_bytes()


def write_uri(uri: str | Path, data: bytes, settings: StackSettings | None = None) -> None:
    """Write atomically: a reader never sees half a file (S3 puts are atomic already)."""
    if is_s3(uri):
        ref = S3Uri.parse(str(uri))
        s3_client(settings or StackSettings()).put_object(Bucket=ref.bucket, Key=ref.key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def upload_files(
    pairs: Sequence[tuple[Path, str]],
    settings: StackSettings | None = None,
    *,
    workers: int = 8,
    on_done: Callable[[int], None] = lambda _n: None,
) -> list[str]:
    """Copy each local file to its URI with `workers` writes in flight, and return the URIs once every
    write has finished. A put to the object store is mostly waiting on the round trip, so one at a time
    left the CPU idle: the quickstart's 3,544 data files took 39 s. `on_done(n)` after each write (n so
    far). The first failure is raised after the writes not yet started are cancelled; the files already
    written stay, so a caller that needs all or nothing writes its marker after this returns (the data
    generator's manifest)."""

    def put(path: Path, uri: str) -> None:
        write_uri(uri, path.read_bytes(), settings)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="upload") as pool:
        futures = [pool.submit(put, path, uri) for path, uri in pairs]
        try:
            for done, future in enumerate(as_completed(futures), 1):
                future.result()
                on_done(done)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [uri for _path, uri in pairs]


def upload_dir(local: Path, uri: str, settings: StackSettings | None = None) -> list[str]:
    """Copy every file under `local` to the prefix `uri` (local or s3://); returns the written URIs."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    return upload_files([(path, join_uri(uri, *path.relative_to(local).parts)) for path in files], settings)


def download_dir(uri: str, local: Path, settings: StackSettings | None = None) -> Path:
    """Materialise the prefix `uri` in `local` (a no-op path for local URIs)."""
    if not is_s3(uri):
        return Path(uri)
    ref = S3Uri.parse(uri)
    client = s3_client(settings or StackSettings())
    prefix = ref.key.rstrip("/") + "/"
    found = False
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=ref.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found = True
            target = local / obj["Key"][len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.get_object(Bucket=ref.bucket, Key=obj["Key"])["Body"].read())
    if not found:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    return local


def fingerprint(uri: str | Path, settings: StackSettings | None = None) -> str:
    """A content fingerprint of a file or a prefix (sha256 over names and content hashes).

    Objects contribute their ETag (the MD5 of a single-part upload), so an S3 prefix is fingerprinted
    from a listing without reading the data; local files are hashed.
    """
    import hashlib

    digest = hashlib.sha256()
    if is_s3(uri):
        ref = S3Uri.parse(str(uri))
        client = s3_client(settings or StackSettings())
        found = False
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=ref.bucket, Prefix=ref.key):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key != ref.key and not key.startswith(ref.key.rstrip("/") + "/"):
                    continue  # a sibling that merely shares the prefix
                found = True
                digest.update(f"{key[len(ref.key) :]}\0{obj['ETag']}\0{obj['Size']}\n".encode())
        if not found:
            raise FileNotFoundError(f"{uri}: no objects under this prefix")
        return digest.hexdigest()
    path = Path(uri)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{uri}: no such file or directory")
    for file in files:
        rel = "" if file == path else file.relative_to(path).as_posix()
        digest.update(f"{rel}\0{hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()
