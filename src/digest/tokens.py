"""Signed, purpose-bound tokens for links in emails (rule 6).

A token signed for one purpose (``unsubscribe``) never validates for another (``approve``):
the purpose is the itsdangerous salt.
"""

from __future__ import annotations

from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from digest.errors import TokenError


def sign(secret: str, purpose: str, payload: Any) -> str:
    """A URL-safe token carrying ``payload`` for ``purpose``."""
    return URLSafeTimedSerializer(secret, salt=f"digest:{purpose}").dumps(payload)


def verify(secret: str, purpose: str, token: str, max_age: float | None = None) -> Any:
    """The payload of a valid token; ``TokenError`` for a forged, foreign or expired one."""
    serializer = URLSafeTimedSerializer(secret, salt=f"digest:{purpose}")
    try:
        return serializer.loads(token, max_age=max_age)
    except SignatureExpired as exc:
        raise TokenError("this link has expired") from exc
    except BadSignature as exc:
        raise TokenError("this link is not valid") from exc
