"""Domain errors of the service layer; ``service/api/app.py`` maps each kind to a status code.

They carry what the client needs to fix the request, never an HTTP status: ``InvalidInput`` is
answered 422, ``LimitExceeded`` 429, ``Conflict`` 409 (see ``app.py``'s ``DOMAIN_STATUS``).
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of the domain errors; ``detail`` is the JSON the client gets as ``detail``."""

    @property
    def detail(self) -> Any:
        """The ``detail`` of the error answer."""
        return str(self)


class InvalidInput(ServiceError):
    """A field of the request is wrong: ``loc`` names it (e.g. ["data", "path"]), ``msg`` says
    what to change."""

    def __init__(self, loc: list[str | int], msg: str, type_: str = "value_error") -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg
        self.type = type_

    @property
    def detail(self) -> list[dict[str, Any]]:
        """A one-item list of ``{loc, msg, type}``, the shape of every 422."""
        return [{"loc": self.loc, "msg": self.msg, "type": self.type}]


class LimitExceeded(ServiceError):
    """A per-user limit would be exceeded; ``numbers`` (e.g. active, limit) go in the answer."""

    def __init__(self, message: str, **numbers: int) -> None:
        super().__init__(message)
        self.numbers = numbers

    @property
    def detail(self) -> dict[str, Any]:
        """``{"message": ..., **numbers}``."""
        return {"message": str(self), **self.numbers}


class Conflict(ServiceError):
    """The request contradicts an earlier one (e.g. an Idempotency-Key reused for another body)."""


__all__ = ["Conflict", "InvalidInput", "LimitExceeded", "ServiceError"]
