"""Reading a bidi stream in lockstep, shared by rnnserve.v1's Stream and the Open Inference
Protocol's ModelStreamInfer: one message at a time on the handler's own task, which a shutdown
may interrupt while it waits."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

Message = TypeVar("Message")


async def next_message(
    requests: AsyncIterator[Message],
    handler: asyncio.Task[Any] | None,
    waiting: set[asyncio.Task[Any]],
    closing: Callable[[], bool],
) -> tuple[Message | None, BaseException | None]:
    """The stream's next message, ``(message, None)``; ``(None, None)`` at the end of input or
    when a shutdown (``closing()`` true) cancelled the wait; ``(None, error)`` when reading
    failed (a message that does not decode, a broken call).

    While it waits, ``handler`` (the calling task) is in ``waiting``, the set a shutdown cancels.
    """
    if handler is not None:
        waiting.add(handler)
    try:
        return await requests.__anext__(), None
    except StopAsyncIteration:
        return None, None
    except asyncio.CancelledError:
        # A shutdown interrupts a lockstep read; nothing of the stream's is in flight then.
        if not closing() or handler is None:
            raise
        if sys.version_info >= (3, 11):
            handler.uncancel()  # this cancel is handled; nothing else was asked
        return None, None
    except Exception as exc:
        return None, exc
    finally:
        if handler is not None:
            waiting.discard(handler)
