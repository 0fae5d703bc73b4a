"""The rnnserve Python SDK: sessions on a stateful recurrent-model server, sync and asyncio.

>>> from rnnserve.client import Client
>>> with Client("127.0.0.1:50051") as client, client.session("char-gru") as s:
...     logits = s.step("In the beginning")        # [16, vocabulary]

See docs/client.md for the guide. Depends on grpcio, protobuf and numpy only.
"""

from .aio import AsyncClient
from .aio_session import AsyncSession
from .client import Client
from .errors import (
    InvalidInput,
    ModelNotFound,
    RnnserveError,
    SeqConflict,
    ServerUnavailable,
    SessionLost,
    StepManyError,
)
from .models import ModelInfo, TensorInfo
from .mux import Multiplexer
from .options import ClientOptions, RetryPolicy
from .session import Session
from .snapshot import Snapshot

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "ClientOptions",
    "InvalidInput",
    "ModelInfo",
    "ModelNotFound",
    "Multiplexer",
    "RetryPolicy",
    "RnnserveError",
    "SeqConflict",
    "ServerUnavailable",
    "Session",
    "SessionLost",
    "Snapshot",
    "StepManyError",
    "TensorInfo",
]
