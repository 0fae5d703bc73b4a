"""Input validation and conversion in the SDK, before any call; options and snapshots."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from rnnserve.client import ClientOptions, InvalidInput, RetryPolicy, Snapshot
from rnnserve.client._convert import (
    decode_outputs,
    encode_inputs,
    encode_state,
    join_outputs,
    split_chunks,
)
from rnnserve.client.errors import RnnserveError
from rnnserve.client.models import ModelInfo
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import to_tensor


def _model(kind: str, features: int = 3, vocab: str = "ab c", max_chunk: int = 4) -> ModelInfo:
    m = pb.ModelInfo(name=f"m-{kind}", version="1", cell="gru", max_chunk_length=max_chunk)
    if kind == "tokens":
        m.input_kind = pb.INPUT_KIND_TOKENS
        m.output_kind = pb.OUTPUT_KIND_LOGITS
        m.input.CopyFrom(pb.TensorSpec(name="x", dtype=pb.DTYPE_INT64, shape=[-1]))
        m.output.CopyFrom(pb.TensorSpec(name="y", dtype=pb.DTYPE_FLOAT32, shape=[-1, len(vocab)]))
        m.vocabulary.extend(vocab)
    else:
        m.input_kind = pb.INPUT_KIND_FEATURES
        m.output_kind = pb.OUTPUT_KIND_REGRESSION
        m.input.CopyFrom(pb.TensorSpec(name="x", dtype=pb.DTYPE_FLOAT32, shape=[-1, features]))
        m.output.CopyFrom(pb.TensorSpec(name="y", dtype=pb.DTYPE_FLOAT32, shape=[-1, 1]))
    m.states.add(name="h", dtype=pb.DTYPE_FLOAT32, shape=[2, 5])
    return ModelInfo.from_proto(m)


def test_feature_shapes_one_step_and_chunk() -> None:
    model = _model("features", features=3)
    chunk, single = encode_inputs(model, [1, 2, 3])
    assert single and chunk.shape == (1, 3) and chunk.dtype == np.float32
    chunk, single = encode_inputs(model, np.ones((5, 3), np.float64))
    assert not single and chunk.shape == (5, 3) and chunk.dtype == np.float32
    with pytest.raises(InvalidInput, match=r"m-features expects float32 \[T, 3\] \(or \[3\]"):
        encode_inputs(model, np.ones((5, 4)))
    with pytest.raises(InvalidInput, match="got a string"):
        encode_inputs(model, "1,2,3")
    with pytest.raises(InvalidInput, match="got dtype bool"):
        encode_inputs(model, np.ones((2, 3), bool))
    with pytest.raises(InvalidInput, match="step 1 is NaN"):
        encode_inputs(model, [[0, 0, 0], [0, np.inf, 0]])


def test_one_feature_model_takes_scalars_and_series() -> None:
    model = _model("features", features=1)
    chunk, single = encode_inputs(model, 2.5)
    assert single and chunk.shape == (1, 1)
    chunk, single = encode_inputs(model, [1.0, 2.0, 3.0])
    assert not single and chunk.shape == (3, 1)
    chunk, single = encode_inputs(model, [[1.0], [2.0]])
    assert not single and chunk.shape == (2, 1)


def test_tokens_from_text_symbols_and_ids() -> None:
    model = _model("tokens", vocab="ab c")
    chunk, single = encode_inputs(model, "a cb")
    assert not single and chunk.tolist() == [0, 2, 3, 1] and chunk.dtype == np.int64
    chunk, single = encode_inputs(model, 3)
    assert single and chunk.tolist() == [3]
    chunk, _ = encode_inputs(model, ["b", "b"])
    assert chunk.tolist() == [1, 1]
    with pytest.raises(InvalidInput, match=r"'z' \(position 1\) is not in its vocabulary of 4"):
        encode_inputs(model, "az")
    with pytest.raises(InvalidInput, match="token id -1"):
        encode_inputs(model, [0, -1])
    with pytest.raises(InvalidInput, match=r"got shape \[2, 2\]"):
        encode_inputs(model, [[0, 1], [1, 0]])
    with pytest.raises(InvalidInput, match="empty chunk"):
        encode_inputs(model, "")
    assert model.decode_tokens([3, 0]) == "ca"


def test_invalid_input_is_a_value_error_with_the_status_code() -> None:
    with pytest.raises(ValueError) as info:
        encode_inputs(_model("features"), [1, 2])
    assert isinstance(info.value, InvalidInput)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_split_and_join() -> None:
    model = _model("features", features=1, max_chunk=4)
    chunk, _ = encode_inputs(model, np.arange(10.0))
    pieces = list(split_chunks(model, chunk))
    assert [p.shape[0] for p in pieces] == [4, 4, 2]
    joined = join_outputs(pieces, single=False)
    assert np.array_equal(joined, chunk)
    assert join_outputs([chunk[:1]], single=True).shape == (1,)


def test_outputs_that_do_not_fit_are_refused() -> None:
    model = _model("features")
    good = decode_outputs(model, to_tensor(np.zeros((3, 1), np.float32)), steps=3)
    assert good.flags.writeable
    with pytest.raises(RnnserveError, match="outputs of shape") as info:
        decode_outputs(model, to_tensor(np.zeros((2, 1), np.float32)), steps=3)
    assert info.value.code == grpc.StatusCode.DATA_LOSS


def test_state_is_checked_against_the_model() -> None:
    model = _model("features")
    encoded = encode_state(model, {"h": np.zeros((2, 5))})
    assert list(encoded) == ["h"] and encoded["h"].dtype == pb.DTYPE_FLOAT32
    with pytest.raises(InvalidInput, match=r"state 'h' .* must be float32 \[2, 5\]"):
        encode_state(model, {"h": np.zeros((5, 2))})
    with pytest.raises(InvalidInput, match="has the state tensors h"):
        encode_state(model, {"c": np.zeros((2, 5))})


def test_snapshot_round_trips_as_bytes() -> None:
    msg = pb.SessionSnapshot(model="m", version="1", next_seq=7, last_seq=5)
    msg.state["h"].CopyFrom(to_tensor(np.arange(10, dtype=np.float32).reshape(2, 5)))
    snap = Snapshot(msg)
    again = Snapshot.from_bytes(snap.to_bytes())
    assert again == snap and again.next_seq == 7 and again.model == "m"
    assert again.state["h"][1, 4] == 9
    with pytest.raises(InvalidInput, match="not an rnnserve session snapshot"):
        Snapshot.from_bytes(b"\xff\xff garbage")


def test_options_channel_arguments_and_validation() -> None:
    options = ClientOptions(
        target="h:1", max_message_bytes=1 << 20, retry=RetryPolicy(max_backoff_s=3)
    )
    args = dict(options.channel_options())
    assert args["grpc.max_receive_message_length"] == 1 << 20
    assert args["grpc.max_reconnect_backoff_ms"] == 3000
    assert options.credentials() is None
    assert options.with_token("t").metadata == (("authorization", "Bearer t"),)
    assert ClientOptions(target="h:1", root_certificates=b"pem").uses_tls
    with pytest.raises(ValueError, match="target"):
        ClientOptions(target="")
    with pytest.raises(ValueError, match="lower case"):
        ClientOptions(target="h:1", metadata=(("Auth", "x"),))
    with pytest.raises(ValueError, match="initial_backoff_s"):
        RetryPolicy(initial_backoff_s=0)
