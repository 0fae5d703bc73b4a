"""What a session id and a route key look like, and how the server makes new ids.

A session id is ``<route key>.<secret>``: the route key is what a proxy hashes on to send all
of a session's calls to one replica (the client's ``x-rnnserve-route`` header, or random), the
secret 16 random bytes, so ids cannot be guessed.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

from rnnserve.server.errors import invalid
from rnnserve.wire import ROUTE_HEADER

#: At least 128 random bits, URL-safe (16 bytes -> 22 characters).
ID_BYTES = 16
#: A route key: what a proxy hashes on to send all of a session's calls to one replica.
ROUTE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def route_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The route key a call's metadata carries (``x-rnnserve-route``), "" when none;
    INVALID_ARGUMENT when it is malformed."""
    for key, value in metadata or ():
        if key == ROUTE_HEADER:
            route = value if isinstance(value, str) else value.decode(errors="replace")
            if not ROUTE_KEY.fullmatch(route):
                raise invalid(
                    f"{ROUTE_HEADER} must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -"
                )
            return route
    return ""


#: A session id: ``<route key>.<secret>`` (or, from before route keys, the secret alone).
SESSION_ID = re.compile(r"(?:[A-Za-z0-9_-]{1,64}\.)?[A-Za-z0-9_-]{22,128}")
#: What this server issues: ``<route key>.<secret>``, the secret 16 random bytes in URL-safe
#: base64. PutState restores into no other id, so a client cannot choose names.
ISSUED_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{22}")
#: Random bytes of a route key the server picks when the client sends none (12 characters).
ROUTE_BYTES = 9


def new_id(route: str = "") -> str:
    """A new session id under ``route``, or under a random route key when it is empty."""
    return f"{route or secrets.token_urlsafe(ROUTE_BYTES)}.{secrets.token_urlsafe(ID_BYTES)}"
