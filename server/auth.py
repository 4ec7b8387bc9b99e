"""Request gates as dependencies: bearer keys (constant-time, never logged) and JSON bodies.

/v1/* needs API_KEY when one is set. /admin/* needs ADMIN_API_KEY and answers 404 when none is
set, so an unconfigured admin surface does not even exist. /health, /ready, /metrics are public.
The gates are `async def` for the reason server/deps.py gives.
"""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Request
from pydantic import SecretStr

from anchor_cache.errors import NotFoundError
from server.errors import Unauthorized, UnsupportedMediaType


def key_matches(header: str | None, key: SecretStr) -> bool:
    scheme, _, token = (header or "").partition(" ")
    given = hashlib.sha256(token.encode()).digest()
    wanted = hashlib.sha256(key.get_secret_value().encode()).digest()
    return scheme.lower() == "bearer" and secrets.compare_digest(given, wanted)


async def require_api_key(request: Request) -> None:
    key = request.app.state.anchor.settings.api_key
    if key is not None and not key_matches(request.headers.get("authorization"), key):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <API_KEY>'")


def is_json(content_type: str) -> bool:
    """`application/json`, in any case, with or without parameters (`; charset=utf-8`)."""
    return content_type.partition(";")[0].strip().lower() == "application/json"


async def require_json(request: Request) -> None:
    """Bodies must be JSON (vLLM's validate_json_request); anything else is a clear 415."""
    if request.method in ("POST", "PUT") and not is_json(request.headers.get("content-type", "")):
        raise UnsupportedMediaType("send the body as JSON with 'Content-Type: application/json'")


async def require_admin_key(request: Request) -> None:
    key = request.app.state.anchor.settings.admin_api_key
    if key is None:
        raise NotFoundError("not found (admin API disabled: set ANCHORSERVE_ADMIN_API_KEY to enable it)")
    if not key_matches(request.headers.get("authorization"), key):
        raise Unauthorized("missing or wrong admin key: send 'Authorization: Bearer <ADMIN_API_KEY>'")
