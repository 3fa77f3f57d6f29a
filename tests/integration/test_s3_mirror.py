"""The local S3 endpoint keeps objects across restarts, including after a kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from argus.config import StackSettings
from argus.storage import S3Uri, ensure_buckets, s3_client, s3_healthy
from argus.supervision import free_port, wait_until

pytestmark = pytest.mark.integration


class S3Server:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.log = data_dir.parent / "s3.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.settings = StackSettings(home=data_dir.parent, s3_port=self.port)

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "argus.stack.s3server",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        if wait:
            assert wait_until(lambda: s3_healthy(self.settings), timeout_s=60), self.log.read_text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[S3Server]:
    srv = S3Server(tmp_path / "s3")
    srv.start()
    yield srv
    if srv.proc and srv.proc.poll() is None:
        srv.kill()


def test_objects_survive_kill_and_restart(server: S3Server, tmp_path: Path) -> None:
    assert set(ensure_buckets(server.settings)) == set(server.settings.buckets)
    client = s3_client(server.settings)
    bucket = server.settings.bucket_data
    client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello", ContentType="text/plain", Metadata={"run": "r1"})
    client.put_object(Bucket=bucket, Key="a", Body=b"same prefix as a directory")
    big = tmp_path / "big.bin"
    big.write_bytes(hashlib.sha256(b"x").digest() * 400_000)  # 12.8 MB: a real multipart upload
    client.upload_file(
        str(big),
        bucket,
        "ckpt/model.bin",
        Config=TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20),
    )
    client.copy_object(Bucket=bucket, Key="copy.txt", CopySource={"Bucket": bucket, "Key": "a/b.txt"})
    client.put_object(Bucket=bucket, Key="gone-1", Body=b"1")
    client.put_object(Bucket=bucket, Key="gone-2", Body=b"2")
    client.delete_object(Bucket=bucket, Key="gone-1")
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "gone-2"}]})
    client.create_bucket(Bucket="short-lived")
    client.delete_bucket(Bucket="short-lived")

    server.kill(signal.SIGKILL)
    server.start()

    client = s3_client(server.settings)
    assert {b["Name"] for b in client.list_buckets()["Buckets"]} == set(server.settings.buckets)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["a", "a/b.txt", "ckpt/model.bin", "copy.txt"]
    obj = client.get_object(Bucket=bucket, Key="a/b.txt")
    assert obj["Body"].read() == b"hello"
    assert obj["ContentType"] == "text/plain" and obj["Metadata"] == {"run": "r1"}
    assert client.get_object(Bucket=bucket, Key="copy.txt")["Body"].read() == b"hello"
    got = client.get_object(Bucket=bucket, Key="ckpt/model.bin")["Body"].read()
    assert got == big.read_bytes()
    assert str(S3Uri.parse(f"s3://{bucket}/ckpt/model.bin")) == f"s3://{bucket}/ckpt/model.bin"


def test_a_corrupt_mirrored_object_is_skipped_not_served(server: S3Server) -> None:
    ensure_buckets(server.settings)
    client = s3_client(server.settings)
    bucket = server.settings.bucket_models
    client.put_object(Bucket=bucket, Key="good", Body=b"good bytes")
    client.put_object(Bucket=bucket, Key="bad", Body=b"bad bytes")
    server.kill(signal.SIGTERM)
    record = server.data_dir / bucket / (hashlib.sha256(b"bad").hexdigest() + ".meta.json")
    bad_data = record.with_name(json.loads(record.read_text())["data"])
    bad_data.write_bytes(b"bit rot")
    server.start()
    keys = [o["Key"] for o in s3_client(server.settings).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["good"]
    assert "data does not match its checksum" in server.log.read_text()


@pytest.mark.reliability
@pytest.mark.parametrize(("point", "restored"), [("s3-after-data", b"version 1"), ("s3-after-meta", b"version 2")])
def test_an_overwrite_killed_at_any_point_restores_a_whole_acknowledged_version(
    server: S3Server, point: str, restored: bytes
) -> None:
    """The write path is cut exactly between its steps (a fault-injection point, as kill -9 would): after
    the new data is on disk but before its record, and after the record but before the old data goes."""
    import botocore.exceptions

    ensure_buckets(server.settings)
    bucket = server.settings.bucket_checkpoints
    s3_client(server.settings).put_object(Bucket=bucket, Key="ckpt/manifest.json", Body=b"version 1")  # acknowledged
    server.kill(signal.SIGTERM)
    server.start(env={"ARGUS_FAULT": point})
    with pytest.raises(botocore.exceptions.BotoCoreError):  # the server dies inside the overwrite
        s3_client(server.settings).put_object(Bucket=bucket, Key="ckpt/manifest.json", Body=b"version 2")
    assert server.proc is not None and server.proc.wait(timeout=30) == 137
    server.start()
    got = s3_client(server.settings).get_object(Bucket=bucket, Key="ckpt/manifest.json")["Body"].read()
    assert got == restored  # never nothing, never a mix
    files = sorted(p.name for p in (server.data_dir / bucket).iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files), files  # one record, its data: no strays


@pytest.mark.reliability
def test_a_mirror_written_before_records_named_their_data_still_restores(server: S3Server) -> None:
    ensure_buckets(server.settings)
    server.kill(signal.SIGTERM)
    bucket_dir = server.data_dir / server.settings.bucket_data
    digest = hashlib.sha256(b"old/layout").hexdigest()
    (bucket_dir / f"{digest}.data").write_bytes(b"old bytes")
    meta = {"key": "old/layout", "sha256": hashlib.sha256(b"old bytes").hexdigest(), "metadata": {}}
    (bucket_dir / f"{digest}.meta.json").write_text(json.dumps(meta))
    (bucket_dir / ".stray.data.tmp").write_bytes(b"half")
    server.start()
    client = s3_client(server.settings)
    assert client.get_object(Bucket=server.settings.bucket_data, Key="old/layout")["Body"].read() == b"old bytes"
    assert not (bucket_dir / ".stray.data.tmp").exists()
