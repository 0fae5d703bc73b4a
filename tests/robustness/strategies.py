"""Hypothesis strategies for every rnnserve.v1 request message and for snapshots.

Values mix the plausible (the test models' names, well-formed tensors of the right size, known
session ids) with the hostile (unknown enum values, negative and huge dimensions, byte counts
that do not match the shape, ids of any length and alphabet, seqs near 2**64), so that both the
deep paths and the refusals are reached. A session id is drawn either as text or as a
placeholder ``@k`` that the test replaces with its k-th live session before sending.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st
from rnnserve.v1 import rnnserve_pb2 as pb

MODELS = ("tiny-gru", "tiny-lstm", "tiny-char")
#: Live sessions the test keeps for requests to name (``@0`` .. ``@{LIVE-1}``).
LIVE = 6
ITEMSIZE = {1: 4, 2: 8, 3: 2, 4: 4, 5: 8}
U64 = 2**64 - 1
I64 = 2**63 - 1

texts = st.text(max_size=40) | st.text(alphabet="abcdefghij-_.0123456789", max_size=200)
session_ids = (
    st.sampled_from([f"@{k}" for k in range(LIVE)])
    | st.just("")
    | texts
    | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789_-.", min_size=22, max_size=90)
)
model_names = st.sampled_from(MODELS) | texts
versions = st.sampled_from(["", "1", "2", "latest"]) | texts
seqs = st.integers(0, 40) | st.integers(0, U64) | st.sampled_from([I64, I64 + 1, U64])
dtypes = st.sampled_from([0, 1, 2, 3, 4, 5]) | st.integers(-(2**31), 2**31 - 1)
dims = st.integers(0, 9) | st.integers(-(2**63), I64) | st.sampled_from([-1, 2**31, 2**62])


@st.composite
def tensors(draw: Any, shapes: Any = None) -> pb.Tensor:
    """A tensor: often the right byte count for its dtype and shape, sometimes not. A large
    well-sized tensor repeats one drawn element (drawing every byte would be slow)."""
    dtype = draw(dtypes)
    shape = draw(shapes if shapes is not None else st.lists(dims, max_size=10))
    elements = math.prod(shape) if all(0 <= d <= 64 for d in shape) else -1
    size = elements * ITEMSIZE.get(dtype, 0)
    if dtype in ITEMSIZE and 0 <= size <= 4096 and draw(st.booleans()):
        if size <= 32:
            raw = draw(st.binary(min_size=size, max_size=size))
        else:
            raw = draw(st.binary(min_size=ITEMSIZE[dtype], max_size=ITEMSIZE[dtype])) * elements
    else:
        raw = draw(st.binary(max_size=40))
    return pb.Tensor(dtype=dtype, shape=shape, raw_data=raw)


#: Chunk-like tensors (float32 [T, 3] for the feature models, int64 [T] for tiny-char) mixed
#: with arbitrary ones, so Step reaches the engine as often as the refusals.
chunk_shapes = (
    st.tuples(st.integers(0, 6), st.just(3)).map(list)
    | st.tuples(st.integers(0, 6)).map(list)
    | st.lists(dims, max_size=10)
)
chunks = tensors(chunk_shapes)
state_maps = st.dictionaries(
    st.sampled_from(["h", "c"]) | texts,
    tensors(st.sampled_from([[2, 8], [2, 16], [8], []]) | st.lists(dims, max_size=4)),
    max_size=3,
)


@st.composite
def snapshots(draw: Any) -> pb.SessionSnapshot:
    snap = pb.SessionSnapshot(
        model=draw(model_names),
        version=draw(versions),
        next_seq=draw(seqs),
        last_seq=draw(seqs),
        last_inputs_digest=draw(st.binary(max_size=20)),
    )
    for name, tensor in draw(state_maps).items():
        snap.state[name].CopyFrom(tensor)
    if draw(st.booleans()):
        snap.last_outputs.CopyFrom(draw(tensors(st.lists(st.integers(0, 4), max_size=3))))
    return snap


def _open(model: str, version: str, state: dict[str, pb.Tensor]) -> pb.OpenSessionRequest:
    req = pb.OpenSessionRequest(model=model, version=version)
    for name, tensor in state.items():
        req.initial_state[name].CopyFrom(tensor)
    return req


steps = st.builds(
    pb.StepRequest, session_id=session_ids, seq=seqs, inputs=chunks, want_state=st.booleans()
)

#: (method name, request) for every unary method of rnnserve.v1.InferenceService.
unary_requests = st.one_of(
    st.tuples(st.just("ListModels"), st.just(pb.ListModelsRequest())),
    st.tuples(
        st.just("GetModel"), st.builds(pb.GetModelRequest, model=model_names, version=versions)
    ),
    st.tuples(st.just("OpenSession"), st.builds(_open, model_names, versions, state_maps)),
    st.tuples(st.just("GetSession"), st.builds(pb.GetSessionRequest, session_id=session_ids)),
    st.tuples(st.just("Step"), steps),
    st.tuples(st.just("CloseSession"), st.builds(pb.CloseSessionRequest, session_id=session_ids)),
    st.tuples(st.just("ResetSession"), st.builds(pb.ResetSessionRequest, session_id=session_ids)),
    st.tuples(st.just("ForkSession"), st.builds(pb.ForkSessionRequest, session_id=session_ids)),
    st.tuples(st.just("GetState"), st.builds(pb.GetStateRequest, session_id=session_ids)),
    st.tuples(
        st.just("PutState"),
        st.builds(pb.PutStateRequest, session_id=session_ids, snapshot=snapshots()),
    ),
)
stream_requests = st.builds(pb.StreamRequest, step=steps, request_id=st.integers(0, U64))
