"""Which replica a session's calls reach, and how much of its history a session keeps.

Behind a proxy that hashes on the route key (rnnserve.proto, Routing), every call of a session
carries ``x-rnnserve-route: <its route key>``, from the OpenSession that creates it on. The SDK
picks a random key per session (or the caller's, to place several sessions together).
"""

from __future__ import annotations

import re
import secrets

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import ROUTE_HEADER, route_of

from .options import ClientOptions

Metadata = tuple[tuple[str, str], ...]

_ROUTE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_route_key() -> str:
    """A random route key (72 bits, 12 URL-safe characters)."""
    return secrets.token_urlsafe(9)


def check_route_key(key: str) -> str:
    """``key`` when it is a valid route key; ValueError saying what one looks like."""
    if not _ROUTE_KEY.fullmatch(key):
        raise ValueError(f"route key {key!r} must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -")
    return key


def routed(
    options: ClientOptions, session_id: str | None = None, route: str | None = None
) -> Metadata:
    """The metadata of a call: the client's own, plus the route key of ``route`` or, when
    that is None, of ``session_id`` (none for a call that belongs to no session)."""
    key = route if route is not None else route_of(session_id) if session_id else None
    return options.metadata if key is None else (*options.metadata, (ROUTE_HEADER, key))


def replay_steps(options: ClientOptions, info: pb.SessionInfo) -> int:
    """Steps of answered chunks a session keeps to replay: the client's setting, and at least
    twice the server's checkpoint interval, so that a session that continues from its last
    checkpoint on another replica can always be brought up to date."""
    return max(options.retry.replay_steps, 2 * int(info.checkpoint_every))
