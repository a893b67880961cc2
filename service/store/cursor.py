"""The opaque ``list_jobs`` cursor: base64url of the JSON ``[created_at, job_id]`` of the last row."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

from service.store.errors import InvalidCursor

MAX_CURSOR_CHARS = 500
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def encode_cursor(created_at: datetime, job_id: str) -> str:
    """The opaque list_jobs cursor for a position after (created_at, id)."""
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, str]:
    if not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_CHARS:
        raise ValueError("not a string of at most 500 characters")
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    value = json.loads(raw)
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise ValueError("not a [created_at, id] pair of strings")
    created, job_id = value
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError("not a job id")
    when = datetime.fromisoformat(created)
    if when.tzinfo is None:
        raise ValueError("a naive timestamp")
    # Converting here (not when the query binds it) makes an overflowing offset, such as
    # 0001-01-01T00:00:00+14:00, a bad cursor instead of an error deep in the database layer.
    return when.astimezone(UTC), job_id


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of :func:`encode_cursor`: (created_at in UTC, job id).

    Raises :class:`InvalidCursor` (a ValueError) for anything this store did not hand out:
    bad base64 or JSON, other shapes or types, a naive, unparsable or overflowing timestamp, an
    id that is not 32 hex digits. Nothing else escapes: a cursor comes from the client.
    """
    try:
        return _decode(cursor)
    except Exception as exc:  # any failure to decode is the client's malformed cursor
        raise InvalidCursor(
            "invalid cursor: pass the 'next' value of the previous page unchanged"
        ) from exc
