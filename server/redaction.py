"""Secrets out of what the server shows: a URL's password becomes *** in logs, `GET /info` and messages.

Standard library only, so that any module (the settings, a state store, the CLI) can use it without
pulling in the engine.
"""

from __future__ import annotations

from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

HIDDEN = "***"


def redact_url(url: str) -> str:
    """`url` fit to show: the password in its user info (`redis://user:pw@h`, `redis://:pw@h`) and
    any `password` query parameter (`redis://h/0?password=pw`, `unix:///s.sock?password=pw`) as ***.

    A user info without a colon is hidden whole, since some clients read a lone name as the password.
    Everything after the scheme is hidden when the URL cannot be parsed or its user info was cut
    short (`userinfo_cut_short`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return HIDDEN
    head = f"{parts.scheme}:" if parts.scheme else ""
    if url[len(head):].startswith("//"):
        head += "//"
    if userinfo_cut_short(parts):
        return head + HIDDEN
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{HIDDEN}@{host}" if colon else f"{HIDDEN}@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, HIDDEN if k.lower() == "password" else v) for k, v in pairs], safe="*/")
    return head + netloc + parts.path + (f"?{query}" if query else "")


def userinfo_cut_short(parts: SplitResult) -> bool:
    """Whether an unencoded `/`, `?` or `#` in a user name or password may have ended the user info
    early, leaving the rest of the password in the path, query or fragment: an `@` there (outside a
    `password` query value), or any fragment at all (no store URL has one)."""
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    after_host = parts.path + "".join(k + v for k, v in pairs if k.lower() != "password")
    return bool(parts.fragment) or "@" in after_host
