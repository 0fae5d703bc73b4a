"""A portable copy of a session: what ``Session.snapshot()`` returns and ``restore()`` takes."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError
from rnnserve.v1 import rnnserve_pb2 as pb

from ._convert import decode_state
from .errors import InvalidInput


class Snapshot:
    """A session's memory cell, seq and last reply, as the server exported it.

    Immutable from the caller's side. ``to_bytes()`` / ``from_bytes()`` serialise it (the
    protobuf ``SessionSnapshot`` encoding), so it can be stored, sent, and restored on another
    server or replica to continue the session exactly where it stood.
    """

    __slots__ = ("_proto",)

    def __init__(self, proto: pb.SessionSnapshot) -> None:
        """Wrap a ``SessionSnapshot`` message (copied, so later changes to it do not leak in)."""
        self._proto = pb.SessionSnapshot()
        self._proto.CopyFrom(proto)

    @property
    def model(self) -> str:
        """The model the session runs."""
        return self._proto.model

    @property
    def version(self) -> str:
        """The model version the session runs."""
        return self._proto.version

    @property
    def next_seq(self) -> int:
        """The seq the session's next chunk carries (steps applied so far)."""
        return int(self._proto.next_seq)

    @property
    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        """The memory cell: state name -> array of its per-session shape (a fresh copy)."""
        return decode_state(self._proto.state)

    def to_proto(self) -> pb.SessionSnapshot:
        """A copy of the underlying message."""
        out = pb.SessionSnapshot()
        out.CopyFrom(self._proto)
        return out

    def to_bytes(self) -> bytes:
        """The snapshot as bytes (deterministic protobuf encoding)."""
        return self._proto.SerializeToString(deterministic=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Snapshot:
        """Parse bytes written by ``to_bytes``; InvalidInput when they are not a snapshot."""
        msg = pb.SessionSnapshot()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise InvalidInput(f"not an rnnserve session snapshot: {exc}") from None
        if not msg.model:
            raise InvalidInput("not an rnnserve session snapshot: it names no model")
        return cls(msg)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __repr__(self) -> str:
        return f"Snapshot(model={self.model!r}, version={self.version!r}, next_seq={self.next_seq})"
