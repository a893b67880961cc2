"""Request headers and path parameters the routes read, parsed at the edge so no handler sees a
value it cannot use: each is bounded and typed in the OpenAPI document (so clients and fuzzers
see the rules), and anything else is a 4xx, never an exception in a handler.

- ``Idempotency-Key``: 1-200 visible ASCII characters (RFC 9110 token-ish; no spaces, no
  control bytes that a database text column would refuse).
- ``Last-Event-ID`` (SSE reconnect): the decimal seq the server sent as the event id. Anything
  else (a forged id, Unicode digits such as "²", which ``str.isdigit`` accepts and ``int``
  refuses) is ignored as the SSE spec allows; a value beyond the seq range is clamped.
- ``Range`` / ``If-Range`` on checkpoint downloads: bounded in length and declared, then parsed
  by Starlette's ``FileResponse`` (400 for a malformed range, 416 for one past the end).
- Ids and checkpoint names in paths: anything outside the characters the service ever issues
  is a 404 without a database query (PostgreSQL refuses NUL in text, which would be a 500).
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Header

__all__ = [
    "IDEMPOTENCY_KEY_PATTERN",
    "IdempotencyKey",
    "IfRangeHeader",
    "LastEventId",
    "RangeHeader",
    "is_plain_name",
    "last_event_seq",
]

IDEMPOTENCY_KEY_MAX = 200
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]+$"  # visible ASCII, as in the OpenAPI document
LAST_EVENT_ID_MAX = 40
RANGE_MAX = 1000  # Starlette also caps a Range at 100 parts

_SEQ_RE = re.compile(r"[0-9]{1,40}")
# Job ids are uuid4 hex, checkpoint names "epoch-0001" and the like.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Retry-safe submission: the same key and body return the same job. 1-200 "
        "visible ASCII characters (a UUID is a good key).",
    ),
]

LastEventId = Annotated[
    str | None,
    Header(
        max_length=LAST_EVENT_ID_MAX,
        description="SSE reconnect: resume after this metric seq (the id of the last event "
        "received). A value that is not a decimal seq is ignored.",
    ),
]

RangeHeader = Annotated[
    str | None,
    Header(
        alias="Range",
        max_length=RANGE_MAX,
        description='Byte range(s), e.g. "bytes=0-1023" (206); malformed: 400; past the end: 416.',
    ),
]

IfRangeHeader = Annotated[
    str | None,
    Header(
        alias="If-Range",
        max_length=RANGE_MAX,
        description="Apply Range only if the file still has this ETag.",
    ),
]


def last_event_seq(value: str | None, *, max_seq: int) -> int | None:
    """The seq a ``Last-Event-ID`` names, clamped to ``max_seq``; None when it names none.

    Only ASCII decimal digits count (surrounding spaces allowed): ``"²"`` or ``"١"`` are not a
    seq the server sent, and ``int()`` of a 4301-digit string would raise, so they are ignored.
    """
    if value is None:
        return None
    text = value.strip()
    if not _SEQ_RE.fullmatch(text):
        return None
    return min(int(text), max_seq)


def is_plain_name(value: str) -> bool:
    """Whether ``value`` looks like an id or checkpoint name the service issues.

    ASCII letters, digits, ``.``, ``_`` and ``-``, 1-200 characters, not starting with a
    punctuation mark. A lookup of anything else can only miss, so routes answer 404 directly.
    """
    return _NAME_RE.fullmatch(value) is not None
