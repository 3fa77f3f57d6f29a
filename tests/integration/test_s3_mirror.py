"""The local S3 endpoint keeps objects across restarts, including after a kill -9."""

from __future__ import annotations

import hashlib
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

    def start(self) -> None:
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
            )
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
    bad_data = server.data_dir / bucket / (hashlib.sha256(b"bad").hexdigest() + ".data")
    bad_data.write_bytes(b"bit rot")
    server.start()
    keys = [o["Key"] for o in s3_client(server.settings).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["good"]
    assert "data does not match its checksum" in server.log.read_text()
