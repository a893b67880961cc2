"""Users and their API tokens (only a token's sha256 is stored)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from service.db import tokens, users, utcnow
from service.store.database import Database
from service.store.records import UserRecord, to_user

TOKEN_PREFIX = "nc_"


def hash_token(token: str) -> str:
    """The sha256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def get_or_create_user(conn: Connection, name: str, admin: bool) -> UserRecord:
    """Inside a write transaction: the user ``name``, created (or promoted to admin) if needed."""
    row = conn.execute(sa.select(users).where(users.c.name == name)).first()
    if row is None:
        conn.execute(sa.insert(users).values(name=name, admin=admin, created_at=utcnow()))
        row = conn.execute(sa.select(users).where(users.c.name == name)).one()
    elif admin and not row.admin:
        conn.execute(sa.update(users).where(users.c.id == row.id).values(admin=True))
        row = conn.execute(sa.select(users).where(users.c.id == row.id)).one()
    return to_user(row)


def _name_taken(token_name: str, *, revoked: bool) -> str:
    """Why ``token_name`` cannot be used: a live token has it, or a revoked one did (names
    are never reused, so the name in old logs and audits stays unambiguous)."""
    if revoked:
        return (
            f"a revoked token named {token_name!r} exists; token names are never reused "
            "— pick another name"
        )
    return f"a token named {token_name!r} already exists"


class UserStore(Database):
    """Users and tokens."""

    def create_user(self, name: str, *, admin: bool = False) -> UserRecord:
        """Create a user, or return the existing one of that name (admin=True promotes it).

        Raises ValueError for a name outside 1..200 characters.
        """
        if not name or len(name) > 200:
            raise ValueError("user name must be 1 to 200 characters")
        try:
            return self._write(lambda conn: get_or_create_user(conn, name, admin))
        except IntegrityError:
            # Another process created it between our read and insert.
            return self._write(lambda conn: get_or_create_user(conn, name, admin))

    def get_user(self, name: str) -> UserRecord | None:
        """The user of that name, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(users).where(users.c.name == name)).first()
        return to_user(row) if row else None

    def create_token(self, user_name: str, token_name: str, *, admin: bool = False) -> str:
        """Create a token for a user (created if missing); returns the plaintext, only this once.

        Token names are unique forever: reusing one, even a revoked one's, raises ValueError
        (whose message says which of the two it is).
        """
        if not token_name or len(token_name) > 200:
            raise ValueError("token name must be 1 to 200 characters")
        self.create_user(user_name, admin=admin)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)

        def tx(conn: Connection) -> None:
            user = get_or_create_user(conn, user_name, admin)
            taken = conn.execute(
                sa.select(tokens.c.revoked_at).where(tokens.c.name == token_name)
            ).first()
            if taken is not None:
                raise ValueError(_name_taken(token_name, revoked=taken.revoked_at is not None))
            conn.execute(
                sa.insert(tokens).values(
                    user_id=user.id,
                    name=token_name,
                    token_hash=hash_token(token),
                    created_at=utcnow(),
                )
            )

        try:
            self._write(tx)
        except IntegrityError as exc:  # a concurrent create took the name (or the hash)
            raise ValueError(_name_taken(token_name, revoked=False)) from exc
        return token

    def revoke_token(self, token_name: str) -> bool:
        """Revoke a token by name; False if no such live token."""

        def tx(conn: Connection) -> bool:
            res = conn.execute(
                sa.update(tokens)
                .where(tokens.c.name == token_name, tokens.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            return res.rowcount == 1

        return self._write(tx)

    def authenticate(self, token: str) -> UserRecord | None:
        """The user a live token belongs to, or None if unknown or revoked."""
        if not isinstance(token, str) or not token or len(token) > 512:
            return None
        digest = hash_token(token)
        with self._read() as conn:
            row = conn.execute(
                sa.select(users, tokens.c.token_hash)
                .join(tokens, tokens.c.user_id == users.c.id)
                .where(tokens.c.token_hash == digest, tokens.c.revoked_at.is_(None))
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return to_user(row)

    def has_users(self) -> bool:
        """True once any user exists."""
        with self._read() as conn:
            return conn.execute(sa.select(users.c.id).limit(1)).first() is not None
