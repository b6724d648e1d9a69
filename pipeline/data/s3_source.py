"""An ``s3://bucket/prefix`` as a dataset source (:class:`~pipeline.data.sources.Source`), through
boto3; an object over ``PIPELINE_MAX_DOWNLOAD_BYTES`` is refused before its body is read
(:class:`~pipeline.config.SourceLimits`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from pipeline.config import SourceLimits
from pipeline.data.sources import CHUNK, Source
from pipeline.errors import SourceLimitError, SourceNotFoundError, SourceUnavailableError
from pipeline.redact import redact_text, redact_uri
from pipeline.s3 import endpoint_url, s3_client


class S3Source(Source):
    """``s3://bucket/prefix`` through boto3 (``AWS_ENDPOINT_URL``, standard credential chain)."""

    def __init__(self, uri: str, limits: SourceLimits | None = None) -> None:
        parsed = urlparse(uri)
        self.uri = uri
        self.limits = limits or SourceLimits.from_env()
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.client = s3_client()
        self._listed: dict[str, dict[str, Any]] = {}

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, name: str, method: str) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            kind = SourceUnavailableError if status >= 500 else SourceNotFoundError
            raise kind(self.file_uri(name), "an existing S3 object", f"S3 {error.get('Code', status)}") from exc
        except NoCredentialsError as exc:
            raise SourceNotFoundError(
                self.file_uri(name), "AWS credentials (environment, profile or role)", "none"
            ) from exc
        except BotoCoreError as exc:
            where = f"a reachable S3 endpoint at {endpoint_url(self.client)}"
            raise SourceUnavailableError(self.file_uri(name), where, redact_text(str(exc))) from exc

    def names(self) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        start = f"{self.prefix}/" if self.prefix else ""
        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    name = item["Key"][len(start) :]
                    if name and not name.endswith("/") and not any(p.startswith(".") for p in name.split("/")):
                        found.append(name)
                        self._listed[name] = {"ETag": item.get("ETag"), "size": item.get("Size")}
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise SourceNotFoundError(
                redact_uri(self.uri), "a bucket and prefix that can be listed", f"S3 {code}"
            ) from exc
        except BotoCoreError as exc:
            where = f"a reachable S3 endpoint at {endpoint_url(self.client)}"
            raise SourceUnavailableError(redact_uri(self.uri), where, redact_text(str(exc))) from exc
        return sorted(found)

    def fingerprint(self, name: str) -> dict[str, Any]:
        if name in self._listed:  # from the listing: no request per object
            return self._listed[name]
        head = self._call(name, "head_object")
        return {"ETag": head.get("ETag"), "size": head.get("ContentLength")}

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        from botocore.exceptions import BotoCoreError

        obj = self._call(name, "get_object")
        where, endpoint = self.file_uri(name), endpoint_url(self.client)
        if (obj.get("ContentLength") or 0) > self.limits.max_download_bytes:
            obj["Body"].close()
            raise SourceLimitError(
                where,
                f"at most {self.limits.max_download_bytes} bytes (PIPELINE_MAX_DOWNLOAD_BYTES)",
                f"an object of {obj['ContentLength']} bytes",
            )

        def chunks() -> Iterator[bytes]:
            try:
                yield from obj["Body"].iter_chunks(CHUNK)
            except (BotoCoreError, OSError) as exc:
                raise SourceUnavailableError(
                    where, f"a complete download from {endpoint}", redact_text(str(exc))
                ) from exc

        return chunks(), obj.get("ContentLength")
