"""URIs -> pyarrow filesystems, so one code path reads a local folder and object storage alike.

    resolve("/data/imagenet")          -> (LocalFileSystem, "/data/imagenet")
    resolve("s3://bucket/imagenet")    -> (S3FileSystem, "bucket/imagenet")

S3-compatible stores (MinIO, Ceph, moto) are reached through the standard AWS_ENDPOINT_URL, or
an explicit endpoint. Credentials come from the standard AWS chain and are never passed around.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


def resolve(uri: str, *, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it; ValueError for a scheme we do not read."""
    if not uri:
        raise ValueError("expected s3://bucket/prefix or a local path, got an empty string")
    if uri.startswith("s3://"):
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"endpoint_override": endpoint} if endpoint else {}
        if endpoint and endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
        return pafs.S3FileSystem(**kwargs), uri.removeprefix("s3://").rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"expected s3://bucket/prefix or a local path, got {uri!r}")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """Join path segments with '/', the separator of every pyarrow filesystem."""
    return "/".join([base.rstrip("/"), *parts])
