"""The session store in Redis: one hash per session, changed only by Lua scripts, so that every
check-and-write of ownership is atomic on the Redis side.

A session's hash ``rnnserve:session:<id>`` holds:

- ``epoch``: its ownership epoch. Each takeover adds one; a replica's checkpoint is written only
  while the epoch is the one it took the session at (fencing: a replica that was paused or cut
  off and comes back cannot overwrite a newer owner's state).
- ``owner``: the replica that holds it (for operators; the epoch is what is checked).
- ``snap``: the serialized ``rnnserve.v1.SessionSnapshot`` of its last checkpoint.
- ``principal``: who opened it (authentication), restored with it.
- ``closed``: set when it was closed: a tombstone (no state) until the key expires.
- ``final``: 1 when ``snap`` is the session's last state on its owner (written by a drain after
  the owner stopped taking work), 0 otherwise. A takeover clears it: the new owner may step the
  session before it writes again. Only a final checkpoint can continue a client that cannot
  replay (an Open Inference Protocol sequence, oip_sequences.py).

An Open Inference Protocol sequence handed over by a drain is found by its name: the string key
``rnnserve:oip:<digest of (caller scope, model, sequence id)>`` holds its session id, followed
by `` pending`` from the drain's start until its final checkpoint is written.

Keys expire with the session TTL. Takeovers are announced on the channel ``rnnserve:moved``
(``<epoch> <session id>``), so a former owner drops its copy at once (durable.py).

This module knows Redis and bytes, not sessions: durable.py decides what to write and when.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

KEY_PREFIX = "rnnserve:session:"
NAME_PREFIX = "rnnserve:oip:"
#: The suffix of a name whose session's final checkpoint is not written yet.
PENDING = " pending"
MOVED_CHANNEL = "rnnserve:moved"
#: Seconds a store operation may take before it counts as failed (the replica then serves from
#: memory and retries later).
TIMEOUT_S = 2.0

#: Take a session over: a new epoch, this replica as owner; its snapshot, principal and whether
#: the snapshot was final (then no longer), or nothing when there is no checkpoint (unknown,
#: expired or closed), or 0, touching nothing, when it is another principal's than ARGV[3].
_CLAIM = """
if redis.call('HEXISTS', KEYS[1], 'snap') == 0 then return false end
if (redis.call('HGET', KEYS[1], 'principal') or '') ~= ARGV[3] then return 0 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local final = redis.call('HGET', KEYS[1], 'final') or '0'
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'final', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {epoch, redis.call('HGET', KEYS[1], 'snap'), redis.call('HGET', KEYS[1], 'principal'),
        final}
"""

#: Own a session whatever holds it now (a restore over it): the next epoch (1 for a new key).
_SEIZE = """
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HDEL', KEYS[1], 'closed')
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return epoch
"""

#: Write a checkpoint if this replica still owns the session at its epoch: 1 written, 0 fenced
#: (another replica took it over, or it was closed). A missing key (expired, or a Redis that
#: lost its data) is written anew at the caller's epoch.
_SAVE = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch then
  if tonumber(epoch) ~= tonumber(ARGV[1]) then return 0 end
  if redis.call('HEXISTS', KEYS[1], 'closed') == 1 then return 0 end
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'owner', ARGV[2], 'snap', ARGV[3],
           'principal', ARGV[4], 'final', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

#: Close a session owned at the caller's epoch: drop its state, keep a tombstone until expiry.
_CLOSE = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and tonumber(epoch) ~= tonumber(ARGV[1]) then return 0 end
redis.call('HDEL', KEYS[1], 'snap', 'principal')
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'closed', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class ForeignSession(Exception):
    """A takeover asked for another principal's session: refused in the store, so a caller
    that guesses an id cannot even move the session."""


@dataclass(frozen=True)
class Claimed:
    """A session taken over from the store."""

    epoch: int
    snapshot: bytes
    principal: str
    #: The snapshot is its former owner's last state (a drain wrote it), not a checkpoint
    #: the owner may have stepped past.
    final: bool


@dataclass(frozen=True)
class Write:
    """One checkpoint (``snapshot`` set) or close (``snapshot`` None) to write."""

    session_id: str
    epoch: int
    snapshot: bytes | None
    principal: str
    ttl_ms: int
    #: A drain's checkpoint: the owner takes no more work for the session.
    final: bool = False


class RedisStore:
    """The sessions' hashes in one Redis (or a Redis-compatible server) at ``url``.

    Every method raises ``redis.exceptions.RedisError`` (or OSError) when Redis cannot be
    reached; callers decide what that means for serving.
    """

    def __init__(self, url: str, replica: str) -> None:
        self.replica = replica
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            retry_on_timeout=False,
            health_check_interval=5,
        )
        self._claim = self._client.register_script(_CLAIM)
        self._seize = self._client.register_script(_SEIZE)
        self._save = self._client.register_script(_SAVE)
        self._close = self._client.register_script(_CLOSE)

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self) -> None:
        await self._client.ping()

    async def claim(self, session_id: str, ttl_ms: int, principal: str) -> Claimed | None:
        """Take ``session_id`` over for ``principal``; None when the store has no checkpoint
        of it; ForeignSession, with nothing changed, when it is another principal's."""
        got = await self._claim(
            keys=[KEY_PREFIX + session_id], args=[self.replica, ttl_ms, principal]
        )
        if got == 0:
            raise ForeignSession(session_id)
        if not got:
            return None
        epoch, snapshot, owner, final = got
        await self._client.publish(MOVED_CHANNEL, f"{int(epoch)} {session_id}")
        return Claimed(int(epoch), bytes(snapshot), (owner or b"").decode(), final == b"1")

    async def seize(self, session_id: str, ttl_ms: int) -> int:
        """Own ``session_id`` from now on, whoever held it (a restore over it); the new epoch."""
        epoch = int(await self._seize(keys=[KEY_PREFIX + session_id], args=[self.replica, ttl_ms]))
        await self._client.publish(MOVED_CHANNEL, f"{epoch} {session_id}")
        return epoch

    async def epoch(self, session_id: str) -> int | None:
        """The session's current epoch in the store (None: no record)."""
        value = await self._client.hget(KEY_PREFIX + session_id, "epoch")
        return None if value is None else int(value)

    async def write(self, writes: Sequence[Write]) -> list[bool]:
        """Write checkpoints and closes in one round trip; for each, whether it was written
        (False: fenced, another replica owns the session now)."""
        async with self._client.pipeline(transaction=False) as pipe:
            for w in writes:
                key = [KEY_PREFIX + w.session_id]
                if w.snapshot is None:
                    await self._close(keys=key, args=[w.epoch, w.ttl_ms], client=pipe)
                else:
                    args: list[bytes | str | int] = [
                        w.epoch, self.replica, w.snapshot, w.principal, w.ttl_ms, int(w.final),
                    ]  # fmt: skip
                    await self._save(keys=key, args=args, client=pipe)
            results = await pipe.execute()
        return [bool(r) for r in results]

    async def name(
        self, names: Sequence[tuple[str, str]], ttl_ms: int, pending: bool = False
    ) -> None:
        """Record each ``(name, session id)`` (a drained OIP sequence's session), for
        ``ttl_ms``; ``pending``: its final checkpoint is still to come."""
        async with self._client.pipeline(transaction=False) as pipe:
            for name, session_id in names:
                value = session_id + PENDING if pending else session_id
                pipe.set(NAME_PREFIX + name, value, px=ttl_ms)
            await pipe.execute()

    async def named(self, name: str) -> tuple[str, bool] | None:
        """The session id recorded under ``name`` and whether it is pending, or None."""
        value = await self._client.get(NAME_PREFIX + name)
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else value
        return text.removesuffix(PENDING), text.endswith(PENDING)

    async def moves(self) -> AsyncIterator[tuple[int, str]]:
        """Takeovers announced by any replica, as ``(epoch, session id)``, until the
        connection fails (RedisError)."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(MOVED_CHANNEL)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None or message.get("type") != "message":
                    continue
                epoch, _, sid = bytes(message["data"]).decode().partition(" ")
                yield int(epoch), sid
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


__all__ = ["Claimed", "ForeignSession", "RedisError", "RedisStore", "Write"]
