"""Object storage: one S3 client factory for every part of Argus (moto locally, MinIO or S3 on clusters)."""

from __future__ import annotations

import re
from dataclasses import dataclass
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
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_url,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
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
