"""The Open Inference Protocol face through rnnserve's own generated stubs (any protobuf): what
Triton's client does not exercise, and what must hold on the newest protobuf too."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.manifest import load_manifest
from rnnserve.server.oip_sequences import Caller
from rnnserve.server.work import Work
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import to_tensor

from tests.support.modelgen import reference_run

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[2]


def _request(
    x: np.ndarray,
    sid: int | str = 1,
    *,
    start: bool = False,
    end: bool = False,
    raw: bool = True,
    **extra: Any,
) -> oip.ModelInferRequest:
    req = oip.ModelInferRequest(model_name="tiny-gru", id=str(extra.pop("rid", "")))
    tensor = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    if isinstance(sid, str):
        req.parameters["sequence_id"].string_param = sid
    else:
        req.parameters["sequence_id"].uint64_param = sid
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    for name in extra.pop("outputs", []):
        req.outputs.add(name=name)
    return req


def _y(reply: oip.ModelInferResponse, name: str = "y") -> np.ndarray:
    for i, out in enumerate(reply.outputs):
        if out.name == name:
            return np.frombuffer(reply.raw_output_contents[i], "<f4").reshape(list(out.shape))
    raise KeyError(name)


def _x(steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (steps, 3)).astype(np.float32)


@pytest.fixture
def stub(server: Any) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(server.address))


async def test_contents_and_raw_inputs_give_the_same_sequence(stub: Any, model_repo: Path) -> None:
    x = _x(5, seed=1)
    want, want_state = reference_run(model_repo / "tiny-gru" / "1", x)
    a = await stub.ModelInfer(_request(x[:2], 1, start=True, raw=False))
    b = await stub.ModelInfer(_request(x[2:], 1, end=True, outputs=["y", "h"]))
    assert np.max(np.abs(np.concatenate([_y(a), _y(b)]) - want)) <= TOL
    assert np.max(np.abs(_y(b, "h") - want_state["h"])) <= TOL
    assert b.model_name == "tiny-gru" and b.model_version == "1"


async def test_start_on_an_open_sequence_begins_it_again(stub: Any, model_repo: Path) -> None:
    x = _x(4, seed=2)
    want, _ = reference_run(model_repo / "tiny-gru" / "1", x)
    await stub.ModelInfer(_request(_x(3, seed=9), "s", start=True))
    again = await stub.ModelInfer(_request(x, "s", start=True))
    assert np.max(np.abs(_y(again) - want)) <= TOL


async def test_requests_sent_without_waiting_apply_in_order(stub: Any, model_repo: Path) -> None:
    """A sequence's requests written to a stream without waiting for replies apply in the
    order sent, START to END, and equal one straight run."""
    x = _x(8, seed=3)
    want, _ = reference_run(model_repo / "tiny-gru" / "1", x)
    requests = [_request(x[t : t + 1], 4, start=t == 0, end=t == 7) for t in range(8)]
    got = [_y(r.infer_response) async for r in stub.ModelStreamInfer(iter(requests))]
    assert np.max(np.abs(np.concatenate(got) - want)) <= TOL


@pytest.mark.parametrize(
    ("mutate", "text"),
    [
        (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "contents field must not"),
        (lambda r: r.raw_input_contents.append(b""), "raw_input_contents entries"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"abc"), "unexpected total byte size"),
        (lambda r: setattr(r.parameters["priority"], "uint64_param", 1), None),
        (lambda r: setattr(r.parameters["sequence_strat"], "bool_param", True), "sequence_strat"),
        (lambda r: setattr(r.parameters["sequence_end"], "string_param", "yes"), "bool"),
        (lambda r: setattr(r.parameters["sequence_id"], "bool_param", True), "int64, uint64"),
        (lambda r: setattr(r.parameters["sequence_id"], "int64_param", -3), "negative"),
    ],
    ids=[
        "both-forms",
        "raw-count",
        "raw-size",
        "other-parameter",
        "typo",
        "flag-type",
        "id-type",
        "id-sign",
    ],
)
async def test_malformed_requests_are_invalid_argument(stub: Any, mutate: Any, text: Any) -> None:
    req = _request(_x(2, seed=4), 1, start=True)
    mutate(req)
    if text is None:  # a parameter rnnserve ignores: the request is fine
        await stub.ModelInfer(req)
        return
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in err.value.details()


async def test_nan_inputs_get_the_models_check(stub: Any) -> None:
    x = _x(2, seed=5)
    x[1, 0] = np.nan
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(_request(x, 1, start=True))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN" in err.value.details()


async def test_a_stream_keeps_each_sequences_order_with_errors_in_band(stub: Any) -> None:
    """Two sequences on one stream; a bad request of one is answered after that sequence's
    earlier replies and before its later ones."""
    x = _x(4, seed=6)
    bad = _request(x[:1], 21)
    bad.inputs[0].datatype = "FP64"
    requests = [
        _request(x[:1], 21, start=True, rid="a0"),
        _request(x[:1], 22, start=True, rid="b0"),
        _request(x[1:2], 21, rid="a1"),
        bad,
        _request(x[2:3], 21, end=True, rid="a2"),
        _request(x[1:2], 22, end=True, rid="b1"),
    ]
    bad.id = "a-bad"
    seen = []
    async for reply in stub.ModelStreamInfer(iter(requests)):
        seen.append("error" if reply.error_message else reply.infer_response.id)
    assert [s for s in seen if s.startswith("a") or s == "error"] == ["a0", "a1", "error", "a2"]
    assert [s for s in seen if s.startswith("b")] == ["b0", "b1"]


class _Collect:
    """A chunk's sink that appends its outputs or its error to a list."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers

    def step_done(self, work: Work, outputs: Any, state: Any) -> None:
        self.answers.append(outputs)

    def step_failed(self, work: Work, err: Exception) -> None:
        self.answers.append(err)


async def test_oip_and_v1_chunks_share_an_engine_run(server: Any, model_repo: Path) -> None:
    """An OIP request and an rnnserve.v1 chunk submitted in one loop tick run as one batch."""
    srv = server.server
    model = srv.repository.resolve("tiny-gru")
    s1, s2 = srv.sessions.open(model), srv.sessions.open(model)
    x = _x(1, seed=7)
    answers: list[Any] = []
    batch = model.metrics.batch_size
    before = batch.counts[:]
    sink = _Collect(answers)
    model.batcher.submit(Work(s1, 0, x, False, sink))  # runs at once, alone
    srv.oip.accept(_request(x, 8, start=True), Caller("peer:test"), answers.append, 0.0)
    model.batcher.submit(Work(s2, 0, x, False, sink))  # joins the OIP chunk
    while len(answers) < 3:
        await asyncio.sleep(0.01)
    assert all(not isinstance(a, Exception) for a in answers)
    added = [n - m for n, m in zip(batch.counts, before, strict=True)]
    assert added[0] == 1 and added[1] == 1  # one run of 1 session, one run of 2


async def test_metrics_say_which_protocol(stub: Any, server: Any) -> None:
    await stub.ModelInfer(_request(_x(1, 8), 1, start=True, end=True))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ModelInfer(_request(_x(1, 8), 1))
    durations = server.server.metrics.request_duration
    assert durations.labels("ModelInfer", "OK", "oip").count == 1
    assert durations.labels("ModelInfer", "INVALID_ARGUMENT", "oip").count == 1


def test_the_messages_live_beside_another_definition_of_inference() -> None:
    """tritonclient (and KServe, MLServer) define ``inference.*`` in protobuf's default pool;
    rnnserve's module imports beside such a definition, in either order."""
    clash = (
        "from google.protobuf import descriptor_pb2, descriptor_pool\n"
        "fd = descriptor_pb2.FileDescriptorProto(name='grpc_service.proto', package='inference')\n"
        "fd.message_type.add(name='ServerLiveRequest')\n"
        "fd.message_type.add(name='ModelInferRequest')\n"
        "descriptor_pool.Default().Add(fd)\n"
    )
    ours = "from inference import grpc_service_pb2_grpc\n"
    for code in (clash + ours, ours + clash):
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr


async def test_rnnserve_v1_still_answers_beside_it(server: Any) -> None:
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    sid = (await stub.OpenSession(pb.OpenSessionRequest(model="tiny-gru"))).session.session_id
    reply = await stub.Step(pb.StepRequest(session_id=sid, seq=0, inputs=to_tensor(_x(1, 9))))
    assert reply.next_seq == 1


ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef01"


def _as(token: str, route: str = "") -> tuple[tuple[str, str], ...]:
    md = (("authorization", f"Bearer {token}"),)
    return (*md, ("x-rnnserve-route", route)) if route else md


async def test_with_tokens_a_sequence_belongs_to_its_principal(
    start_server: Any, model_repo: Path
) -> None:
    """With tokens the scope is the principal: a sequence goes on over a new connection, two
    principals' sequence 1 are apart, the route key names the session, and the principal's
    session quota counts OIP sequences too."""
    running = await start_server(auth_tokens=f"alice:{ALICE},bob:{BOB}", principal_max_sessions=1)
    x = _x(4, seed=10)
    want, _ = reference_run(model_repo / "tiny-gru" / "1", x)

    def stub() -> Any:
        return oip_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(running.address))

    a0 = await stub().ModelInfer(_request(x[:2], 1, start=True), metadata=_as(ALICE, "k1"))
    await stub().ModelInfer(_request(_x(2, seed=11), 1, start=True), metadata=_as(BOB))
    a1 = await stub().ModelInfer(_request(x[2:], 1), metadata=_as(ALICE))  # a new connection
    assert np.max(np.abs(np.concatenate([_y(a0), _y(a1)]) - want)) <= TOL
    [session] = [s for s in running.server.sessions.all() if s.principal == "alice"]
    assert session.id.startswith("k1.")
    with pytest.raises(grpc.aio.AioRpcError) as err:  # alice already holds her one session
        await stub().ModelInfer(_request(x[:1], 2, start=True), metadata=_as(ALICE))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as err:  # no token, no call
        await stub().ModelInfer(_request(x[:1], 1))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_malformed_route_key_is_refused_on_both_rpcs(stub: Any) -> None:
    bad = (("x-rnnserve-route", "no spaces allowed"),)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(_request(_x(1, 12), 1, start=True), metadata=bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        requests = iter([_request(_x(1, 12), 1, start=True)])
        async for _ in stub.ModelStreamInfer(requests, metadata=bad):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-rnnserve-route" in err.value.details()


async def test_a_shutdown_ends_open_streams_with_unavailable(server: Any) -> None:
    """A stream waiting for its next request (lockstep) and one reading ahead (two sequences)
    both end with UNAVAILABLE when the server stops."""
    stub = oip_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(server.address))
    lockstep, ahead = stub.ModelStreamInfer(), stub.ModelStreamInfer()
    await lockstep.write(_request(_x(1, 13), 1, start=True))
    await lockstep.read()
    for sid in (1, 2):
        await ahead.write(_request(_x(1, 13), sid, start=True))
        await ahead.read()
    await server.server.stop(2.0)
    for call in (lockstep, ahead):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_every_shipped_model_tells_the_truth_in_its_metadata(start_server: Any) -> None:
    """ModelMetadata of every shipped model version matches its manifest, and a sequence run
    from what the metadata says (names, datatypes, shapes) returns outputs of those shapes."""
    shipped = ROOT / "models"
    versions = sorted(p.parent for p in shipped.glob("*/*/manifest.json"))
    if not versions:
        pytest.skip(f"no shipped models under {shipped} yet")
    running = await start_server(models=shipped, self_check=False, reload_interval_s=0)
    stub = oip_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(running.address))
    for folder in versions:
        m = load_manifest(folder)
        meta = await stub.ModelMetadata(oip.ModelMetadataRequest(name=m.name, version=m.version))
        [tin] = meta.inputs
        tokens = m.input_kind == "tokens"
        assert (tin.name, tin.datatype) == (m.input_name, "INT64" if tokens else "FP32")
        assert list(tin.shape) == ([-1] if tokens else [-1, m.input_size])
        outs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
        assert outs == {
            m.output_name: ("FP32", [-1, m.output_size]),
            **{s.name: ("FP32", s.shape) for s in m.states},
        }
        x = np.zeros([4 if d == -1 else d for d in tin.shape], np.int64 if tokens else np.float32)
        req = oip.ModelInferRequest(model_name=m.name, model_version=m.version)
        req.inputs.add(name=tin.name, datatype=tin.datatype, shape=x.shape)
        req.raw_input_contents.append(x.tobytes())
        req.parameters["sequence_id"].string_param = folder.parent.name
        req.parameters["sequence_start"].bool_param = True
        req.parameters["sequence_end"].bool_param = True
        for name in outs:
            req.outputs.add(name=name)
        reply = await stub.ModelInfer(req)
        got = {o.name: list(o.shape) for o in reply.outputs}
        assert got == {n: [4 if d == -1 else d for d in shape] for n, (_, shape) in outs.items()}


async def test_principal_max_streams_counts_model_stream_infer(start_server: Any) -> None:
    running = await start_server(auth_tokens=f"alice:{ALICE}", principal_max_streams=1)
    stub = oip_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(running.address))
    first = stub.ModelStreamInfer(metadata=_as(ALICE))
    await first.write(_request(_x(1, 14), 1, start=True))
    await first.read()
    second = stub.ModelStreamInfer(metadata=_as(ALICE))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await second.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "principal_max_streams" in err.value.details()
    await first.done_writing()
