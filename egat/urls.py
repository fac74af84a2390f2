"""URLs fit for messages and logs (a module of its own: tracking imports it without torch)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_QUERY_KEY = re.compile(r"sig|signature|token|key|secret|pass|auth|credential", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` fit for messages and logs: no user:password, no values of token-like query parameters."""
    parts = urlsplit(url)
    netloc = parts.netloc
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if "@" not in netloc and not any(_SECRET_QUERY_KEY.search(k) for k, _ in pairs):
        return url  # nothing to hide; rebuilding would alter e.g. sqlite:////abs/path
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = urlencode([(k, "***" if _SECRET_QUERY_KEY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))
