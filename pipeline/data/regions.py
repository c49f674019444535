"""The region an S3 bucket's requests must be signed for: the bucket's own, as S3 names it.

S3 refuses a request signed for another region than its bucket's (a 301 redirect, which pyarrow does not
follow), and nothing names the region on a cluster's nodes: botocore does not take it from the instance's
metadata, and EKS's pod identity webhook gives a pod the cluster's region, not the bucket's. So storage.py
asks S3 once per bucket and process (bucket_region), as pyarrow's own FileSystem.from_uri does on AWS. It
does so through boto3 because pyarrow.fs.resolve_s3_region always asks AWS itself, never an endpoint
override (AWS_ENDPOINT_URL, --s3-endpoint): an S3-compatible store names its own region the same way.

A bucket whose region is not named (a 403 without it: credentials that may not list the bucket; a store that
never sends it; no such bucket; no answer) is signed for the configured region, else us-east-1, as before.
"""

from __future__ import annotations

import functools
import os

# HeadBucket's attempts, as storage.CHECK_ATTEMPTS: an endpoint where nothing listens is answered in under a
# second, and the check that follows names it. Seconds to connect and to wait for the answer.
ATTEMPTS = 3
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0

# (endpoint, bucket) -> (the region the store named or None, HeadBucket's HTTP status). Only answers that
# will not change are kept (the bucket there, or access refused): a missing bucket may be created, and a store
# that did not answer may answer next time.
_known: dict[tuple[str | None, str], tuple[str | None, int]] = {}


def region_for(bucket: str | None, endpoint: str | None) -> str:
    """The region to sign `bucket`'s requests for. The bucket's own wins over a configured one: S3 refuses a
    request signed for any other, so a configured region that differs could only fail. The configured region,
    then us-east-1, where the bucket's is not named (or no bucket is given)."""
    return (bucket and bucket_region(bucket, endpoint)) or configured_region() or "us-east-1"


def configured_region() -> str | None:
    """The region the environment names, in the order pyarrow's AWS SDK reads it: AWS_DEFAULT_REGION,
    AWS_REGION (which boto3 does not read), then the profile's."""
    import boto3  # deferred: boto3 takes ~0.3 s to import, and only s3:// needs it

    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or boto3.Session().region_name


def s3_endpoint(endpoint: str | None = None) -> str | None:
    """Where s3:// requests go: `endpoint`, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; None for AWS."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def bucket_region(bucket: str, endpoint: str | None) -> str | None:
    """The region S3 (or the store at `endpoint`) names for `bucket`; None where it names none (see above).
    Asked once per process: HeadBucket's x-amz-bucket-region header, which S3 sends with a redirect and with
    a refusal too."""
    key = (endpoint, bucket)
    if key not in _known:
        region, status = _head_bucket(bucket, endpoint)
        if region is None and status not in (200, 403):
            return None
        _known[key] = region, status
    return _known[key][0]


def refused_note(bucket: str, endpoint: str | None, region: str) -> str:
    """Words for an error at `bucket` whose region the store refused to name (HTTP 403 without it), whose
    requests were therefore signed for `region` (the configured one, else us-east-1); "" for any other bucket.
    `endpoint` as s3_endpoint takes it."""
    if _known.get((s3_endpoint(endpoint), bucket)) != (None, 403):
        return ""
    return (
        f"bucket {bucket!r}'s region could not be asked (HTTP 403): requests were signed for {region}, the "
        f"configured region or else us-east-1; if the bucket is in another, set AWS_REGION to it"
    )


def _head_bucket(bucket: str, endpoint: str | None) -> tuple[str | None, int]:
    """HeadBucket's x-amz-bucket-region header and HTTP status (0: no answer)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = _client(endpoint, configured_region() or "us-east-1").head_bucket(Bucket=bucket)
    except ClientError as e:
        response = e.response
    except BotoCoreError:  # no answer, or no credentials: the check that follows names it
        return None, 0
    metadata = response.get("ResponseMetadata", {})
    return metadata.get("HTTPHeaders", {}).get("x-amz-bucket-region") or None, metadata.get("HTTPStatusCode", 0)


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, region: str):
    """One S3 client per endpoint and region, for HeadBucket alone (making one takes ~0.1 s; using it, not)."""
    import boto3  # deferred: as above
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        # Path-style at an endpoint override, as pyarrow addresses it (a store's host need not resolve
        # bucket.host). On AWS, boto3 follows S3's redirect to the bucket's region itself.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    return boto3.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
