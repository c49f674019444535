"""URIs -> pyarrow filesystems, so one code path reads a local folder and object storage alike.

    resolve("/data/imagenet")          -> (LocalFileSystem, "/data/imagenet")
    resolve("s3://bucket/imagenet")    -> (S3FileSystem, "bucket/imagenet")

S3-compatible stores (MinIO, Ceph, moto) are reached through the standard AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), or an explicit endpoint. Credentials come from the standard AWS chain
(environment, profile files, instance role); they are checked once on the driver, so a machine
without any fails in a second with a clear message instead of timing out deep inside a read, and
they never travel in a URI, a log line or an MLflow param.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.fs as pafs


def resolve(uri: str, *, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it; ValueError for a scheme we do not read."""
    if not uri:
        raise ValueError("expected s3://bucket/prefix or a local path, got an empty string")
    if uri.startswith("s3://"):
        bucket_and_key = uri.removeprefix("s3://").rstrip("/")
        if "@" in bucket_and_key.split("/", 1)[0]:
            raise ValueError("credentials do not belong in an s3:// URI (they would end up in logs); "
                             "use the AWS environment variables, a profile or an instance role")
        if not bucket_and_key:
            raise ValueError(f"expected s3://bucket/prefix, got {uri!r}")
        return s3_filesystem(endpoint), bucket_and_key
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"expected s3://bucket/prefix or a local path, got {uri!r}")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())


def s3_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    import boto3

    session = boto3.Session()
    if session.get_credentials() is None:
        raise PermissionError(
            "no AWS credentials found for s3://: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or run where an instance role provides them")
    endpoint = s3_endpoint(endpoint)
    kwargs: dict = {"region": session.region_name or "us-east-1"}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "http" if endpoint.startswith("http://") else "https"
    # pyarrow reads the same standard chain itself, so no key is copied into the filesystem object.
    return pafs.S3FileSystem(**kwargs)


def join(base: str, *parts: str) -> str:
    """Join path segments with '/', the separator of every pyarrow filesystem."""
    return "/".join([base.rstrip("/"), *parts])


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole object. On object storage a PUT is atomic; locally we rename into place."""
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def sha256_of(fs: pafs.FileSystem, path: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
