"""``Multiplexer.step_many``: one chunk for each of many sessions, as few frames as possible.

The inputs are checked and converted once, as one array (no per-entry conversion); each
session's chunk is a row of it. Every round sends each unfinished entry's next chunk (a replay
first, as for a single step), grouped into frames per lane and chunk shape, and hands each
entry's reply to its session's ChunkDriver, which decides as for a single step: outputs, a
retry after a wait, or the exception of that entry. Entries that fail do not stop the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np

from ._convert import Array, encode_inputs
from ._driver import STREAM_RETRY_CODES, ChunkDriver
from ._frames import FrameKey, FrameReply, Part, StreamBroken, frame_key, settle_entry
from ._ledger import Chunk
from .aio_session import AsyncSession
from .errors import InvalidInput, RnnserveError, StepManyError
from .models import ModelInfo

if TYPE_CHECKING:
    from .mux import Multiplexer


def _shapes(model: ModelInfo) -> tuple[str, tuple[int, ...], tuple[int, ...], int]:
    vocabulary = len(model.vocabulary) if model.is_tokens else 0
    return (model.input.dtype.str, model.step_shape, model.output.shape[1:], vocabulary)


def check_models(sessions: Sequence[AsyncSession]) -> tuple[ModelInfo, int]:
    """The model every session's inputs are checked against, and the longest chunk every
    session's server takes (0: no limit); InvalidInput when the sessions' models take or return
    other shapes than the first one's."""
    if not sessions:
        raise InvalidInput("step_many needs at least one session")
    model = sessions[0].model
    want = _shapes(model)
    limit = model.max_chunk_length
    # Each distinct model version once (its sessions may hold separate ModelInfo objects).
    checked = {(model.name, model.version)}
    for k, session in enumerate(sessions):
        other = session.model
        if (other.name, other.version) in checked:
            continue
        checked.add((other.name, other.version))
        if other.max_chunk_length > 0:
            limit = min(limit, other.max_chunk_length) if limit > 0 else other.max_chunk_length
        if _shapes(other) != want:
            raise InvalidInput(
                f"step_many needs sessions whose models take and return the same shapes: "
                f"session {k} runs {other.name} ({other.input.describe()} -> "
                f"{other.output.describe()}), session 0 runs {model.name} "
                f"({model.input.describe()} -> {model.output.describe()}); call it once per "
                "model"
            )
    return model, limit


def encode_many(model: ModelInfo, x: object, n: int) -> tuple[Array, bool]:
    """Check and convert the inputs of ``n`` entries: ``([n, T, ...], one_step_each)``.

    Feature models: ``[n, features]`` (one step each) or ``[n, T, features]``. Token models:
    ``[n]`` ids (one step each), ``[n, T]`` ids, or ``n`` strings of equal length.
    """
    if model.is_tokens and isinstance(x, list | tuple) and x and isinstance(x[0], str):
        rows = [encode_inputs(model, item)[0] for item in x]
        if len({row.shape[0] for row in rows}) != 1:
            raise InvalidInput(
                f"step_many on model {model.name}: every entry needs the same number of steps; "
                f"got texts of lengths {sorted({row.shape[0] for row in rows})}"
            )
        return _check_count(model, np.stack(rows), n), False
    step_shape = model.step_shape
    expected = (
        f"step_many on model {model.name} expects {n} entries: "
        f"{model.input.dtype.name} [{n}, T{''.join(f', {d}' for d in step_shape)}] "
        f"(or [{n}{''.join(f', {d}' for d in step_shape)}] for one step each)"
    )
    if isinstance(x, str | bytes):
        raise InvalidInput(f"{expected}; got a string")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{expected}; the inputs are not one array ({exc})") from None
    kinds = "iu" if model.is_tokens else "fiu"
    if arr.dtype.kind not in kinds:
        raise InvalidInput(f"{expected}; got dtype {arr.dtype.name}")
    if arr.ndim == len(step_shape) + 1 and arr.shape[1:] == step_shape:
        chunks, single = arr[:, np.newaxis], True
    elif arr.ndim == len(step_shape) + 2 and arr.shape[2:] == step_shape:
        chunks, single = arr, False
    else:
        raise InvalidInput(f"{expected}; got shape {list(arr.shape)}")
    if chunks.shape[0] != n:
        raise InvalidInput(f"{expected}; got {chunks.shape[0]} entries")
    if chunks.shape[1] == 0:
        raise InvalidInput(f"{expected}; got empty chunks (T = 0)")
    if model.is_tokens:
        vocab_size = len(model.vocabulary)
        bad = (chunks < 0) | (chunks >= vocab_size)
        if np.any(bad):
            entry = int(np.argwhere(bad)[0][0])
            raise InvalidInput(
                f"model {model.name}: entry {entry} has token id {int(chunks[bad][0])}, "
                f"not below its vocabulary size {vocab_size}"
            )
    out = chunks.astype(model.input.dtype, copy=False)
    if not model.is_tokens and not np.all(np.isfinite(out)):
        entry, step = (int(v) for v in np.argwhere(~np.isfinite(out))[0][:2])
        raise InvalidInput(f"model {model.name}: entry {entry}, step {step} is NaN or infinite")
    return out, single


def _check_count(model: ModelInfo, chunks: Array, n: int) -> Array:
    if chunks.shape[0] != n:
        raise InvalidInput(f"step_many on model {model.name}: {n} sessions, {len(chunks)} inputs")
    return chunks


async def step_many(mux: Multiplexer, sessions: Sequence[AsyncSession], x: object) -> Array:
    """See ``Multiplexer.step_many``."""
    model, limit = check_models(sessions)
    n = len(sessions)
    chunks, single = encode_many(model, x, n)
    ids = [s.id for s in sessions]
    if len(set(ids)) != n:
        raise InvalidInput(
            "step_many takes each session once (its chunk is one row); join a session's "
            "chunks into one, or call step_many again"
        )
    steps = int(chunks.shape[1])
    out = np.full((n, steps, *model.output.shape[1:]), np.nan, dtype=model.output.dtype)
    errors: dict[int, RnnserveError] = {}
    locks = []
    try:
        # A fixed order, so that two step_many calls sharing sessions cannot deadlock.
        task = asyncio.current_task()
        for i in sorted(range(n), key=ids.__getitem__):
            lock = sessions[i]._lock
            if not lock.try_acquire(task):
                await lock.__aenter__()
            locks.append(lock)
        in_doubt = []
        for i, session in enumerate(sessions):
            if session._core.closed:
                errors[i] = RnnserveError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"session {session.id} is closed"
                )
            elif session._core.ledger.pending is not None:
                in_doubt.append(i)
        if in_doubt:  # a chunk left in doubt by an earlier failure goes first, as for step()
            settled = await asyncio.gather(
                *(mux._drive(sessions[i]) for i in in_doubt), return_exceptions=True
            )
            for i, result in zip(in_doubt, settled, strict=True):
                if isinstance(result, RnnserveError):
                    errors[i] = result
                elif isinstance(result, BaseException):
                    raise result
        size = limit if 0 < limit < steps else steps
        for start in range(0, steps, size):
            live = [i for i in range(n) if i not in errors]
            if not live:
                break
            part = slice(start, start + size)
            await _round(mux, sessions, live, chunks[:, part], out[:, part], errors)
    finally:
        for lock in reversed(locks):
            lock.release()
    result = out[:, 0] if single else out
    if errors:
        raise StepManyError(result, errors)
    return result


async def _round(
    mux: Multiplexer,
    sessions: Sequence[AsyncSession],
    live: list[int],
    piece: Array,
    out: Array,
    errors: dict[int, RnnserveError],
) -> None:
    """Row i of ``piece`` for each live entry i, driven to its outputs (into ``out[i]``) or
    to its exception (into ``errors[i]``).

    Each pass sends every unfinished entry's next chunk (``to_send``: a replay first), one part
    per lane and chunk length. The common case costs no per-entry objects beyond the ledger's:
    a part of submitted rows takes them from ``piece`` in one indexing, and a reply without
    errors whose ``next_seqs`` are all as expected is recorded without the ChunkDriver, which
    is made only for an entry that fails or replays.
    """
    loop = asyncio.get_running_loop()
    steps = int(piece.shape[1])
    submitted = [sessions[i]._core.ledger.submit(piece[i]) for i in live]
    fresh = dict(zip(live, submitted, strict=True))  # entries whose chunk is their submitted row
    drivers: dict[int, ChunkDriver] = {}

    def driver(i: int) -> ChunkDriver:
        found = drivers.get(i)
        if found is None:
            found = drivers[i] = sessions[i]._core.driver()
        return found

    keys: dict[int, FrameKey] = {}
    active = live
    while active:
        groups: dict[tuple[str, int], tuple[list[int], list[Chunk]]] = {}
        for i in active:
            session = sessions[i]
            chunk = session._core.ledger.to_send()
            assert chunk is not None
            group = groups.get((session.id.partition(".")[0], chunk.steps))
            if group is None:
                group = groups[(session.id.partition(".")[0], chunk.steps)] = ([], [])
            group[0].append(i)
            group[1].append(chunk)
        sent: list[tuple[list[int], list[Chunk], bool]] = []
        waits: list[asyncio.Future[tuple[FrameReply, int]]] = []
        for (_, length), (members, chunks) in groups.items():
            lane = mux._lane(sessions[members[0]])
            key = keys.get(length)
            if key is None:
                key = keys[length] = frame_key(sessions[members[0]].model, length)
            for at in range(0, len(members), lane.max_frame):
                who, what = members[at : at + lane.max_frame], chunks[at : at + lane.max_frame]
                rows = length == steps and all(
                    fresh.get(i) is c for i, c in zip(who, what, strict=True)
                )
                if rows and len(who) == len(piece):
                    inputs = piece
                elif rows:
                    inputs = piece[who]
                else:
                    inputs = np.stack([c.inputs for c in what])
                ids = [sessions[i].id for i in who]
                frame_part = Part(ids, [c.seq for c in what], inputs, key, loop)
                waits.append(lane.submit(frame_part))
                sent.append((who, what, rows))
        results: list[tuple[FrameReply, int] | BaseException]
        if len(waits) == 1:
            try:
                results = [await waits[0]]
            except StreamBroken as exc:
                results = [exc]
        else:
            results = list(await asyncio.gather(*waits, return_exceptions=True))
        active, delay = [], 0.0
        for (who, what, rows), result in zip(sent, results, strict=True):
            if isinstance(result, StreamBroken):
                for i in who:
                    try:
                        wait = driver(i).on_failure(
                            result.code, result.message, None, retry_codes=STREAM_RETRY_CODES
                        )
                    except RnnserveError as exc:
                        errors[i] = exc
                        continue
                    active.append(i)
                    delay = max(delay, wait)
                continue
            if isinstance(result, BaseException):
                raise result
            reply, offset = result
            outputs = reply.outputs
            if (
                rows
                and outputs is not None
                and not reply.errors
                and reply.whole is None
                and reply.next_seqs[offset : offset + len(who)] == [c.end for c in what]
            ):  # every entry answered as expected: record them without drivers
                for i, chunk in zip(who, what, strict=True):
                    sessions[i]._core.ledger.on_outputs(chunk.seq, outputs)
                out[who] = outputs[offset : offset + len(who)]
                continue
            done_rows, done = [], []
            for k, i in enumerate(who):
                try:
                    got = settle_entry(driver(i), reply, offset + k)
                except RnnserveError as exc:
                    errors[i] = exc
                    continue
                if isinstance(got, np.ndarray):
                    done_rows.append(offset + k)
                    done.append(i)
                else:
                    active.append(i)
                    delay = max(delay, got or 0.0)
            if done and outputs is not None:
                out[done] = outputs[done_rows]
        if active and delay > 0:
            await asyncio.sleep(delay)
