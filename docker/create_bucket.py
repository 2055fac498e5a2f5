"""Create the bucket APP_STORAGE_URL names (s3://bucket/prefix) unless it exists: the one-shot
``store-init`` service of docker-compose.yml runs it before the API and the workers start.

boto3 reads the endpoint and the keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_REGION, as the application does. Safe to run again.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger("create_bucket")
DENIED = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    url = os.environ.get("APP_STORAGE_URL", "")
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        log.error("APP_STORAGE_URL must be s3://bucket[/prefix], got %r", url)
        return 2
    bucket = parts.netloc
    s3 = boto3.client("s3", config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    deadline = time.monotonic() + float(os.environ.get("STORE_WAIT_S", "60"))
    while True:
        try:
            try:
                s3.head_bucket(Bucket=bucket)
                log.info("bucket %s exists", bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                s3.create_bucket(Bucket=bucket)
                log.info("bucket %s created", bucket)
            return 0
        except (BotoCoreError, ClientError) as exc:
            refused = isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in DENIED
            # The store answers its healthcheck a moment before its filer takes buckets; wrong
            # keys stay wrong.
            if refused or time.monotonic() > deadline:
                log.error("cannot create bucket %s: %s", bucket, exc)
                return 1
            time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
