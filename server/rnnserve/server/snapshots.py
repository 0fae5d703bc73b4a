"""A session as a portable ``SessionSnapshot``, and a snapshot checked whole against its model
before it becomes a session again.

The one way a session leaves a replica (GetState, a checkpoint to the store) and the one way it
enters one (PutState, a takeover from the store): both directions live here, so what one writes
the other reads.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from rnnserve.server import codec
from rnnserve.server.errors import invalid
from rnnserve.server.model import ServedModel
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import MAX_SEQ, Session
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import TensorError, from_tensor, to_tensor

#: Domain separation of the snapshot MAC (a new version of it changes this).
MAC_CONTEXT = b"rnnserve-snapshot-v1\0"
#: Length of rnnserve.wire.chunk_digest.
DIGEST_BYTES = 16


def take(session: Session) -> pb.SessionSnapshot:
    """The snapshot of ``session`` as it is now (call it while no chunk of it is running)."""
    model = session.model
    m = model.manifest
    snap = pb.SessionSnapshot(model=m.name, version=m.version, next_seq=session.next_seq)
    for name, value in model.pool.read(session.slot).items():
        to_tensor(value, snap.state[name])
    if session.last_outputs is not None:
        snap.last_seq = session.last_seq
        to_tensor(session.last_outputs, snap.last_outputs)
        snap.last_inputs_digest = session.last_digest
    return snap


@dataclass(frozen=True)
class Restored:
    """A snapshot that fits its model: what a session needs to continue exactly."""

    model: ServedModel
    state: dict[str, npt.NDArray[np.float32]]
    next_seq: int
    #: The last applied chunk's seq and outputs (read-only), so a retry of it stays
    #: idempotent; outputs None when the snapshot has none.
    last_seq: int
    last_outputs: npt.NDArray[np.float32] | None
    last_digest: bytes


def check(snap: pb.SessionSnapshot, repository: Repository) -> Restored:
    """Check every field of ``snap`` against its model; INVALID_ARGUMENT (NOT_FOUND for a model
    not served here) saying what to fix."""
    if not snap.model:
        raise invalid("snapshot.model is empty; send a snapshot taken with GetState")
    model = repository.resolve(snap.model, snap.version)
    state = codec.decode_state(model, snap.state)
    if snap.next_seq > MAX_SEQ:
        raise invalid(f"snapshot.next_seq {snap.next_seq} is past the largest seq {MAX_SEQ}")
    last_outputs = None
    if snap.HasField("last_outputs"):
        outputs = _last_outputs(model, snap.last_outputs)
        end = snap.last_seq + outputs.shape[0]
        if end != snap.next_seq:
            raise invalid(
                f"snapshot.last_outputs covers seq {snap.last_seq} to {end}, "
                f"but next_seq is {snap.next_seq}"
            )
        if len(snap.last_inputs_digest) not in (0, DIGEST_BYTES):
            raise invalid(
                f"snapshot.last_inputs_digest has {len(snap.last_inputs_digest)} bytes; "
                f"it is {DIGEST_BYTES} bytes (or empty)"
            )
        last_outputs = outputs.astype(np.float32, copy=True)
        last_outputs.flags.writeable = False
    return Restored(
        model, state, snap.next_seq, snap.last_seq, last_outputs, snap.last_inputs_digest
    )


def _last_outputs(model: ServedModel, tensor: pb.Tensor) -> npt.NDArray[np.generic]:
    """The last reply's outputs: float32 ``[T, outputs]`` with T >= 1, as the model makes."""
    try:
        outputs = from_tensor(tensor)
    except TensorError as exc:
        raise invalid(f"snapshot.last_outputs: {exc}") from None
    width = model.manifest.output_size
    if (
        outputs.dtype != np.float32
        or outputs.ndim != 2
        or outputs.shape[0] < 1
        or outputs.shape[1] != width
    ):
        raise invalid(
            f"snapshot.last_outputs is {outputs.dtype.name} {list(outputs.shape)}; "
            f"{model.label} makes float32 [T, {width}] with T >= 1"
        )
    return outputs


def _mac(snap: pb.SessionSnapshot, key: bytes, principal: str) -> bytes:
    unsigned = pb.SessionSnapshot()
    unsigned.CopyFrom(snap)
    unsigned.ClearField("mac")
    # Deterministic encoding (map entries sorted), prefixed with the principal: a snapshot
    # signed for one principal does not check for another.
    data = unsigned.SerializeToString(deterministic=True)
    return hmac.new(key, MAC_CONTEXT + principal.encode() + b"\0" + data, "sha256").digest()


def sign(snap: pb.SessionSnapshot, key: bytes, principal: str) -> pb.SessionSnapshot:
    """``snap`` with its ``mac`` set under the deployment's snapshot ``key`` for ``principal``."""
    snap.mac = _mac(snap, key, principal)
    return snap


def verify(snap: pb.SessionSnapshot, key: bytes, principal: str) -> None:
    """INVALID_ARGUMENT unless ``snap`` carries the mac ``sign`` gave it for ``principal``."""
    if not snap.mac:
        raise invalid(
            "snapshot.mac is empty: this server restores only snapshots it signed; send a "
            "snapshot taken with GetState from this deployment"
        )
    if not hmac.compare_digest(snap.mac, _mac(snap, key, principal)):
        raise invalid(
            "snapshot.mac does not check: the snapshot was altered, taken by another principal, "
            "or signed by another deployment's snapshot key"
        )


def resume(session: Session, restored: Restored) -> None:
    """Give a freshly opened ``session`` (holding ``restored.state``) the snapshot's seq and
    last reply."""
    session.next_seq = restored.next_seq
    if restored.last_outputs is not None:
        session.last_seq = restored.last_seq
        session.last_outputs = restored.last_outputs
        session.last_digest = restored.last_digest
