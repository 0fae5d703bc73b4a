"""Triton's own client, unmodified from PyPI, against rnnserve's Open Inference Protocol face.

tritonclient 2.73 needs protobuf < 7, so these tests run in the second test environment
(``make test-compat``, noxfile.py); where tritonclient is not installed they are skipped. The
server runs in a background thread of this process (``server_thread``): Triton's client and
rnnserve's server share one process, which only works because rnnserve keeps its
``inference.*`` messages out of protobuf's default descriptor pool.
"""

from __future__ import annotations

import itertools
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

grpcclient = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] runs in `make test-compat` (protobuf < 7)"
)
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.support.modelgen import reference_run, write_model  # noqa: E402

TOL = 1e-5


def _x(model: str, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if model == "tiny-char":
        return rng.integers(0, 20, steps).astype(np.int64)
    return rng.normal(0.0, 1.0, (steps, 3)).astype(np.float32)


DATATYPES = {
    np.dtype(np.int64): "INT64",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}


def _input(x: np.ndarray) -> Any:
    tensor = grpcclient.InferInput("x", list(x.shape), DATATYPES[x.dtype])
    tensor.set_data_from_numpy(x)
    return tensor


@pytest.fixture
def triton(server_thread: Any) -> Any:
    client = grpcclient.InferenceServerClient(server_thread.address)
    yield client
    client.close()


def test_server_and_model_metadata(triton: Any) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("tiny-lstm")
    assert not triton.is_model_ready("no-such-model")
    assert triton.get_server_metadata().name == "rnnserve"
    meta = triton.get_model_metadata("tiny-lstm", as_json=True)
    assert meta["name"] == "tiny-lstm" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "3"]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs["y"] == ("FP32", ["-1", "2"])
    assert set(outputs) == {"y", "h", "c"}  # the memory cell, sent only when asked for
    char = triton.get_model_metadata("tiny-char", as_json=True)
    assert char["inputs"] == [{"name": "x", "datatype": "INT64", "shape": ["-1"]}]
    index = triton.get_model_repository_index(as_json=True)
    assert {m["name"] for m in index["models"]} == {"tiny-gru", "tiny-lstm", "tiny-char"}


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-char"])
def test_a_sequence_over_model_infer_equals_onnxruntime(
    triton: Any, model_repo: Path, model: str
) -> None:
    x = _x(model, 12, seed=1)
    want, want_state = reference_run(model_repo / model / "1", x)
    bounds = [0, 1, 5, 6, 12]  # requests of 1, 4, 1 and 6 steps
    got = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        last = b == len(x)
        outputs = [grpcclient.InferRequestedOutput("y")]
        if last:
            outputs.append(grpcclient.InferRequestedOutput("h"))
        result = triton.infer(
            model,
            [_input(x[a:b])],
            outputs=outputs,
            sequence_id=7,
            sequence_start=i == 0,
            sequence_end=last,
        )
        got.append(result.as_numpy("y").reshape(b - a, -1))
        assert result.as_numpy("h") is None or last
    assert np.max(np.abs(np.concatenate(got) - want)) <= TOL
    h = result.as_numpy("h").reshape(want_state["h"].shape)
    assert np.max(np.abs(h - want_state["h"])) <= TOL


def test_the_state_travels_only_when_asked_for(triton: Any) -> None:
    x = _x("tiny-lstm", 3, seed=2)
    result = triton.infer("tiny-lstm", [_input(x)], sequence_id=1, sequence_start=True)
    assert [o.name for o in result.get_response().outputs] == ["y"]


def test_a_batch_of_one_axis_is_accepted_and_returned(triton: Any, model_repo: Path) -> None:
    x = _x("tiny-gru", 4, seed=3)
    want, _ = reference_run(model_repo / "tiny-gru" / "1", x)
    result = triton.infer(
        "tiny-gru", [_input(x[None])], sequence_id="s", sequence_start=True, sequence_end=True
    )
    y = result.as_numpy("y")
    assert y.shape == (1, 4, 2)
    assert np.max(np.abs(y[0] - want)) <= TOL


def test_interleaved_sequences_over_async_stream_infer(triton: Any, model_repo: Path) -> None:
    """Three sequences (int and string ids) on one stream, step by step, interleaved; each
    equals onnxruntime, and each sequence's replies come in its order."""
    ids: list[int | str] = [11, 12, "thirteen"]
    xs = {sid: _x("tiny-lstm", 6, seed=20 + i) for i, sid in enumerate(ids)}
    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for t in range(6):
            for sid in ids:
                triton.async_stream_infer(
                    "tiny-lstm",
                    [_input(xs[sid][t : t + 1])],
                    request_id=f"{sid}:{t}",
                    sequence_id=sid,
                    sequence_start=t == 0,
                    sequence_end=t == 5,
                )
        got: dict[str, list[np.ndarray]] = {str(sid): [] for sid in ids}
        for _ in range(6 * len(ids)):
            result, error = replies.get(timeout=30)
            assert error is None, error
            sid, t = result.get_response().id.split(":")
            assert int(t) == len(got[sid])  # in order within the sequence
            got[sid].append(result.as_numpy("y"))
    finally:
        triton.stop_stream()
    for sid in ids:
        want, _ = reference_run(model_repo / "tiny-lstm" / "1", xs[sid])
        assert np.max(np.abs(np.concatenate(got[str(sid)]) - want)) <= TOL


def test_end_frees_the_session(triton: Any, server_thread: Any) -> None:
    sessions = server_thread.server.sessions
    before = len(sessions)
    x = _x("tiny-gru", 2, seed=4)
    triton.infer("tiny-gru", [_input(x)], sequence_id=99, sequence_start=True)
    assert len(sessions) == before + 1
    triton.infer("tiny-gru", [_input(x)], sequence_id=99, sequence_end=True)
    assert len(sessions) == before
    with pytest.raises(InferenceServerException) as err:
        triton.infer("tiny-gru", [_input(x)], sequence_id=99)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must specify the START flag" in err.value.message()


def test_sequences_of_two_clients_with_one_id_are_isolated(
    server_thread: Any, model_repo: Path
) -> None:
    """Two connections both use sequence 5 at once; each sees only its own state. (Two
    clients in one process share one connection unless told not to: gRPC shares a connection
    between channels of the same settings.)"""
    xs = [_x("tiny-gru", 8, seed=30 + i) for i in range(2)]
    got: list[list[np.ndarray]] = [[], []]

    def run(i: int) -> None:
        client = grpcclient.InferenceServerClient(
            server_thread.address, channel_args=[("grpc.use_local_subchannel_pool", 1)]
        )
        try:
            for t in range(8):
                result = client.infer(
                    "tiny-gru", [_input(xs[i][t : t + 1])], sequence_id=5, sequence_start=t == 0
                )
                got[i].append(result.as_numpy("y"))
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    for i in range(2):
        want, _ = reference_run(model_repo / "tiny-gru" / "1", xs[i])
        assert np.max(np.abs(np.concatenate(got[i]) - want)) <= TOL


@pytest.mark.parametrize(
    ("inputs", "kwargs", "status", "text"),
    [
        (lambda: [_input(_x("tiny-gru", 2, 0))], {}, "INVALID_ARGUMENT", "correlation ID"),
        (
            lambda: [_input(_x("tiny-gru", 2, 0).astype(np.float64))],
            {"sequence_id": 1, "sequence_start": True},
            "INVALID_ARGUMENT",
            "data-type is 'FP64', but model 'tiny-gru' expects 'FP32'",
        ),
        (
            lambda: [_input(np.zeros((2, 4), np.float32))],
            {"sequence_id": 1, "sequence_start": True},
            "INVALID_ARGUMENT",
            "unexpected shape for input 'x'",
        ),
        (
            lambda: [_input(_x("tiny-gru", 2, 0)), _input(_x("tiny-gru", 2, 0))],
            {"sequence_id": 1, "sequence_start": True},
            "INVALID_ARGUMENT",
            "expected 1 inputs but got 2 inputs",
        ),
        (
            lambda: [_input(_x("tiny-gru", 2, 0))],
            {
                "sequence_id": 1,
                "outputs": [grpcclient.InferRequestedOutput("nope")],
                "sequence_start": True,
            },
            "INVALID_ARGUMENT",
            "unexpected inference output 'nope'",
        ),
        (
            lambda: [_input(_x("tiny-gru", 2, 0))],
            {"sequence_id": 12345},
            "INVALID_ARGUMENT",
            "must specify the START flag on the first request of the sequence",
        ),
    ],
    ids=["no-sequence-id", "datatype", "shape", "two-inputs", "unknown-output", "no-start"],
)
def test_bad_requests_get_tritons_statuses(
    triton: Any, inputs: Any, kwargs: dict[str, Any], status: str, text: str
) -> None:
    with pytest.raises(InferenceServerException) as err:
        triton.infer("tiny-gru", inputs(), **kwargs)
    assert err.value.status() == f"StatusCode.{status}"
    assert text in err.value.message()


def test_an_unknown_model_is_not_found(triton: Any) -> None:
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("no-such-model")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        triton.infer("no-such-model", [_input(_x("tiny-gru", 1, 0))], sequence_id=1)
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_a_bad_request_on_a_stream_is_answered_in_band_and_the_stream_goes_on(
    triton: Any,
) -> None:
    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        good = _x("tiny-gru", 1, 0)
        triton.async_stream_infer("tiny-gru", [_input(good)], sequence_id=3, sequence_start=True)
        triton.async_stream_infer("tiny-gru", [_input(good.astype(np.float64))], sequence_id=3)
        triton.async_stream_infer("tiny-gru", [_input(good)], sequence_id=3, sequence_end=True)
        outcomes = [replies.get(timeout=30) for _ in range(3)]
    finally:
        triton.stop_stream()
    assert outcomes[0][1] is None and outcomes[2][1] is None
    assert "expects 'FP32'" in outcomes[1][1].message()


DOC = Path(__file__).resolve().parents[2] / "docs" / "oip.md"


def _doc_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)


@pytest.mark.parametrize("index", range(2))
def test_docs_example_runs(
    index: int,
    model_repo: Path,
    server_thread_factory: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_model(model_repo, "co2-gru", input_size=1, output_size=1, seed=4)
    server = server_thread_factory()
    code = _doc_examples()[index].replace("127.0.0.1:50051", server.address)
    exec(compile(code, f"{DOC.name} example {index + 1}", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip(), "every example prints its result"


def test_the_proto_matches_tritonclients_wire_format() -> None:
    """Every message and RPC of proto/inference/grpc_service.proto is Triton's, field by field:
    the same names, numbers, types and labels as the descriptors tritonclient ships."""
    from inference import grpc_service_pb2 as ours
    from tritonclient.grpc import service_pb2 as theirs

    def repeated(f: Any) -> bool:
        if hasattr(f, "is_repeated"):  # protobuf >= 6.31; label is deprecated there
            return bool(f.is_repeated() if callable(f.is_repeated) else f.is_repeated)
        return bool(f.label == f.LABEL_REPEATED)

    def fields(message: Any) -> dict[str, tuple[Any, ...]]:
        return {
            f.name: (
                f.number,
                f.type,
                repeated(f),
                f.message_type and f.message_type.full_name,
                f.containing_oneof and f.containing_oneof.name,
            )
            for f in message.fields
        }

    def walk(message: Any) -> list[Any]:
        return [message, *(m for n in message.nested_types for m in walk(n))]

    for top in ours.DESCRIPTOR.message_types_by_name.values():
        for message in walk(top):
            twin = theirs.DESCRIPTOR.pool.FindMessageTypeByName(message.full_name)
            assert fields(message) == fields(twin), message.full_name
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    twin_service = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        twin = twin_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            twin.input_type.full_name,
            twin.output_type.full_name,
        )
        assert (method.client_streaming, method.server_streaming) == (
            twin.client_streaming,
            twin.server_streaming,
        )
