"""Read a JSON body sent without ``Content-Type: application/json``.

``curl -d @spec.json URL`` sends ``application/x-www-form-urlencoded``; FastAPI would then hand
the raw bytes to the body model and answer an opaque 422 ("Input should be a valid dictionary").
No route of this API takes a form, so such a body is read as JSON, and so is one with no
Content-Type at all (FastAPI's strict default would refuse it). Any other non-JSON type still reaches the route, and its 422 says to
send ``Content-Type: application/json`` (``service.api.app.validation_error_handler``).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

FORM = b"application/x-www-form-urlencoded"
JSON = b"application/json"
NOT_JSON_HINT = "send the body as JSON with Content-Type: application/json"


def is_json_type(value: str | None) -> bool:
    """True when a Content-Type header value (or its absence) is read as JSON here."""
    if not value:
        return True
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class FormAsJsonMiddleware:
    """On body methods, make a form-urlencoded or a missing Content-Type ``application/json``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, its form Content-Type (curl's default) replaced by JSON's."""
        if scope["type"] == "http" and scope.get("method") in {"POST", "PUT", "PATCH"}:
            headers = scope.get("headers", [])
            types = [v.split(b";")[0].strip().lower() for k, v in headers if k == b"content-type"]
            if not types:
                scope = {**scope, "headers": [*headers, (b"content-type", JSON)]}
            elif types[0] == FORM:
                rewritten = [(k, JSON if k == b"content-type" else v) for k, v in headers]
                scope = {**scope, "headers": rewritten}
        await self.app(scope, receive, send)
