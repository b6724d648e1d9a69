"""One boto3 S3 client configuration for the whole pipeline.

boto3 itself honours ``AWS_ENDPOINT_URL`` (MinIO, moto, other S3-compatible stores) and the
standard credential chain; we only add bounded retries and timeouts so that an unreachable
endpoint fails in seconds with a clear message instead of hanging a task.
"""

from __future__ import annotations

from typing import Any


def s3_client() -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
    )
    return boto3.client("s3", config=config)


def endpoint_url(client: Any) -> str:
    """The endpoint a client talks to (``AWS_ENDPOINT_URL`` or AWS's regional one), for errors."""
    return client.meta.endpoint_url
