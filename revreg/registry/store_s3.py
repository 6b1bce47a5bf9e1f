"""S3-compatible blob store (AWS S3, MinIO, Ceph...), via boto3.

Blobs live at s3://BUCKET/PREFIX/sha256/ab/<hex>. A blob is staged and checked locally, then
uploaded in parts (multipart for large blobs) with If-None-Match: * so two writers cannot
clobber one another; a multipart object is invisible until its upload completes. Credentials
and region come from the usual AWS environment; AWS_ENDPOINT_URL points at MinIO-style servers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from revreg.errors import InputError, IntegrityError, RevregError
from revreg.registry.store import BlobStore, StagedBlob, check_digest

PART_SIZE = 64 << 20  # multipart part size; S3 allows 5 MiB to 5 GiB per part
MULTIPART_THRESHOLD = 64 << 20


class _Body:
    """A botocore streaming body with the readinto() that revreg's copy loops use."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self._body.read(len(buf))
        n = len(data)
        memoryview(buf)[:n] = data
        return n

    def read(self, n: int = -1) -> bytes:
        return self._body.read(None if n < 0 else n)

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3BlobStore(BlobStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any = None,
        part_size: int = PART_SIZE,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        import boto3

        if part_size < 5 << 20:
            raise InputError("S3 multipart parts must be at least 5 MiB")
        self.part_size, self.multipart_threshold = part_size, multipart_threshold
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
        self.staging_dir = Path(os.environ.get("REVREG_STAGING") or Path(tempfile.gettempdir()) / "revreg-staging")

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise InputError(f"{url!r} is not an S3 location: use s3://bucket/prefix")
        return cls(parts.netloc, parts.path)

    def key(self, digest: str) -> str:
        hexpart = check_digest(digest).split(":", 1)[1]
        return "/".join(p for p in (self.prefix, "sha256", hexpart[:2], hexpart) if p)

    def _error(self, exc: Exception, what: str) -> RevregError:
        return RevregError(f"S3 {what} failed for s3://{self.bucket}/{self.prefix}: {exc}")

    def create(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            raise self._error(exc, "bucket check") from exc

    def commit(self, staged: StagedBlob) -> None:
        from botocore.exceptions import ClientError

        key = self.key(staged.digest)
        try:
            if staged.size < self.multipart_threshold:
                with open(staged.path, "rb") as fh:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=fh, IfNoneMatch="*")
            else:
                self._multipart(staged, key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return  # content-addressed: whoever wrote it first wrote the same bytes
            raise self._error(exc, "upload") from exc

    def _multipart(self, staged: StagedBlob, key: str) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = []
            with open(staged.path, "rb") as fh:
                number = 1
                while block := fh.read(self.part_size):
                    etag = self.client.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=block
                    )["ETag"]
                    parts.append({"ETag": etag, "PartNumber": number})
                    number += 1
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
            )
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise

    def open(self, digest: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(digest))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise IntegrityError(f"blob {digest} is missing from {self.describe()}: run `revreg fsck`") from exc
            raise self._error(exc, "download") from exc
        return _Body(body)  # type: ignore[return-value]

    def exists(self, digest: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
            return True
        except ClientError:
            return False

    def digests(self) -> Iterator[str]:
        base = "/".join(p for p in (self.prefix, "sha256") if p) + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for item in page.get("Contents", []):
                yield "sha256:" + item["Key"].rsplit("/", 1)[1]

    @contextmanager
    def orphan(self, digest: str, grace: float) -> Iterator[bool | None]:
        """An object is written once, complete (If-None-Match), right before its row commits; one
        older than `grace` without a row is abandoned."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except ClientError:
            yield None
            return
        yield True if (datetime.now(UTC) - head["LastModified"]).total_seconds() >= grace else None

    def remove(self, digest: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(digest))

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
