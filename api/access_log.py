"""Access-log hygiene: a signed download link is a bearer credential until it expires, so its
signature must not be written to logs that operators, log shippers and support staff read."""

from __future__ import annotations

import logging
import re

# ``sig`` (our HMAC links) and the S3 presigned-URL credentials, whatever else the query holds.
_SECRET_PARAM = re.compile(r"(?i)([?&](?:sig|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s]*")
REDACTED = "REDACTED"
ACCESS_LOGGER = "uvicorn.access"


def redact(text: str) -> str:
    """``text`` with the values of signature-bearing query parameters replaced."""
    return _SECRET_PARAM.sub(rf"\g<1>{REDACTED}", text)


class RedactSignedLinks(logging.Filter):
    """Rewrites uvicorn's access records (``'%s - "%s %s HTTP/%s" %d'`` with the path and query as
    the third argument) so that the record, whatever formats it later, holds no signature."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install() -> None:
    """Attach the filter to uvicorn's access logger once (a filter on the logger itself holds for
    every handler uvicorn's logging configuration adds later)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactSignedLinks) for f in logger.filters):
        logger.addFilter(RedactSignedLinks())
