"""The Open Inference Protocol codec and sequence table, on real model versions (no server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2 as oip
from prometheus_client import CollectorRegistry
from rnnserve.server.errors import ServingError
from rnnserve.server.metrics import Metrics
from rnnserve.server.model import ServedModel
from rnnserve.server.oip_codec import (
    build_response,
    decode_request,
    model_metadata,
    raw_inputs,
    sequence_of,
)
from rnnserve.server.oip_sequences import SWEEP_EVERY, SequenceTable
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import CLOSED, SessionManager
from rnnserve.server.settings import Settings

from tests.support.modelgen import make_repo


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServedModel]]:
    repo = make_repo(tmp_path_factory.mktemp("oip") / "models")
    repository = Repository(Settings(models=repo), Metrics(CollectorRegistry()))
    names = ("tiny-gru", "tiny-lstm", "tiny-char")
    loaded = {n: repository.load_version(repo / n / "1") for n in names}
    yield loaded
    for model in loaded.values():
        model.close()


def _request(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> oip.ModelInferRequest:
    req = oip.ModelInferRequest(model_name="tiny-gru")
    req.inputs.add(name=name, datatype=datatype, shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def test_metadata_names_every_tensor_with_dynamic_steps(models: dict[str, ServedModel]) -> None:
    lstm = model_metadata(models["tiny-lstm"], ["1"])
    assert lstm.platform == "onnxruntime_onnx" and list(lstm.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in lstm.inputs] == [("x", "FP32", [-1, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in lstm.outputs] == [
        ("y", "FP32", [-1, 2]),
        ("h", "FP32", [2, 8]),
        ("c", "FP32", [2, 8]),
    ]
    char = model_metadata(models["tiny-char"], ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in char.inputs] == [("x", "INT64", [-1])]


@pytest.mark.parametrize(
    ("set_id", "want"),
    [
        (lambda p: setattr(p, "int64_param", 7), 7),
        (lambda p: setattr(p, "uint64_param", 2**64 - 1), 2**64 - 1),
        (lambda p: setattr(p, "string_param", "abc"), "abc"),
        (lambda p: setattr(p, "int64_param", 0), None),
        (lambda p: setattr(p, "string_param", ""), None),
    ],
)
def test_sequence_ids_of_every_kind(set_id: Any, want: Any) -> None:
    req = oip.ModelInferRequest()
    set_id(req.parameters["sequence_id"])
    req.parameters["sequence_end"].bool_param = True
    got = sequence_of(req)
    if want is None:
        assert got is None
    else:
        assert got is not None and (got.id, got.start, got.end) == (want, False, True)
    assert sequence_of(oip.ModelInferRequest()) is None


def test_a_batch_of_one_axis_round_trips(models: dict[str, ServedModel]) -> None:
    model = models["tiny-gru"]
    x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    req = _request(x)
    req.outputs.add(name="h")
    decoded = decode_request(model, req, raw_inputs(req)[0])
    assert decoded.batched and decoded.states == ("h",) and not decoded.want_output
    assert list(decoded.inputs.shape) == [4, 3]
    outputs = np.zeros((4, 2), np.float32)
    reply = build_response(model, req, decoded, outputs, {"h": np.ones((2, 8), np.float32)})
    assert [(o.name, list(o.shape)) for o in reply.outputs] == [("h", [1, 2, 8])]
    assert reply.raw_output_contents[0] == np.ones((2, 8), np.float32).tobytes()


def test_contents_become_the_same_chunk_as_raw_bytes(models: dict[str, ServedModel]) -> None:
    model = models["tiny-char"]
    ids = np.array([3, 1, 4, 1, 5], np.int64)
    raw = _request(ids, datatype="INT64")
    listed = oip.ModelInferRequest()
    t = listed.inputs.add(name="x", datatype="INT64", shape=[5])
    t.contents.int64_contents.extend(ids.tolist())
    a = decode_request(model, raw, raw_inputs(raw)[0]).inputs
    b = decode_request(model, listed, raw_inputs(listed)[0]).inputs
    assert a == b


@pytest.mark.parametrize(
    ("x", "name", "datatype", "text"),
    [
        (np.zeros((2, 3), np.float32), "h", "FP32", "unexpected inference input 'h'"),
        (np.zeros((2, 3), np.float32), "x", "INT64", "data-type is 'INT64'"),
        (np.zeros((2, 2, 3), np.float32), "x", "FP32", "Expected [-1,3] (or [1,-1,3])"),
        (np.zeros((3,), np.float32), "x", "FP32", "got [3]"),
    ],
)
def test_bad_inputs_say_what_to_fix(
    models: dict[str, ServedModel], x: np.ndarray, name: str, datatype: str, text: str
) -> None:
    req = _request(x, name, datatype)
    with pytest.raises(ServingError) as err:
        decode_request(models["tiny-gru"], req, raw_inputs(req)[0])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert text in err.value.message


def test_the_table_scopes_ends_after_inflight_and_sweeps(models: dict[str, ServedModel]) -> None:
    sessions = SessionManager(Metrics(CollectorRegistry()), 600.0, 1000)
    table = SequenceTable(sessions)
    model = models["tiny-gru"]
    a = table.start(("peer:a", "tiny-gru", 1), model)
    b = table.start(("peer:b", "tiny-gru", 1), model)
    assert a.session is not b.session and len(sessions) == 2
    with pytest.raises(ServingError, match="must specify the START flag"):
        table.find(("peer:c", "tiny-gru", 1))
    assert table.submitted(a, 3) == 0 and table.submitted(a, 2) == 3
    table.finish(("peer:a", "tiny-gru", 1), a)  # END arrived; two chunks still in flight
    assert a.session.ended is None and table.peek(("peer:a", "tiny-gru", 1)) is None
    table.answered(a, failed=False)
    table.answered(a, failed=False)
    assert a.session.ended == CLOSED and len(sessions) == 1
    # A failed chunk: the sequence goes on from what was applied.
    table.submitted(b, 4)
    table.answered(b, failed=True)
    assert b.next_seq == b.session.next_seq == 0
    # Sequences whose session ended without END are forgotten by the periodic sweep.
    sessions.end(b.session, CLOSED)
    for i in range(SWEEP_EVERY):
        table.start(("peer:z", "tiny-gru", i), model)
        if i % 100 == 0:
            sessions.end(table.peek(("peer:z", "tiny-gru", i)).session, CLOSED)  # type: ignore[union-attr]
    assert table.peek(("peer:b", "tiny-gru", 1)) is None
    assert len(table) < SWEEP_EVERY
