"""Property test over every request message: about 3,000 generated requests (well-typed
messages of every unary method, Stream messages, and raw bytes that may not decode at all) go
to a real server through a real channel, about 40 at a time concurrently (the coverage-guided
fuzz target, test_fuzz_target.py, sends 10,000 more). Every call must end
with a defined status (never UNKNOWN, INTERNAL or a timeout; a Stream's in-band errors too), the
server must stay SERVING, and a bystander session driven between the batches must produce
bit-identical outputs to the same sequence run on a quiet server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import to_tensor

from tests.robustness import strategies as gen

#: Statuses that would mean the server did not understand what went wrong.
UNDEFINED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
UNDEFINED_INBAND = {c.value[0] for c in UNDEFINED}
EXAMPLES = 80
SERVICE = "/rnnserve.v1.InferenceService/"
METHODS = [
    "ListModels",
    "GetModel",
    "OpenSession",
    "GetSession",
    "Step",
    "CloseSession",
    "ResetSession",
    "ForkSession",
    "GetState",
    "PutState",
]
garbage = st.tuples(st.sampled_from(METHODS), st.binary(max_size=120))
batches = st.tuples(
    st.lists(gen.unary_requests, min_size=30, max_size=40),
    st.lists(garbage, max_size=6),
    st.lists(gen.stream_requests, max_size=8),
)


def _fill(request: Any, live: list[str]) -> Any:
    """``request`` with ``@k`` session ids replaced by the k-th live session."""
    for holder in (request, getattr(request, "step", None)):
        sid = getattr(holder, "session_id", "")
        if sid.startswith("@") and sid[1:].isdigit():
            holder.session_id = live[int(sid[1:]) % len(live)]
    return request


class Bystander:
    """A tiny-lstm session stepped alone between batches, checked against a reference run."""

    def __init__(self, stub: pb_grpc.InferenceServiceStub, chunks: int) -> None:
        rng = np.random.default_rng(7)
        self.stub = stub
        self.inputs = [rng.normal(size=(3, 3)).astype(np.float32) for _ in range(chunks)]
        reference = self._open()
        self.expected = [self._step(reference, i) for i in range(chunks)]
        stub.CloseSession(pb.CloseSessionRequest(session_id=reference))
        self.sid = self._open()
        self.done = 0

    def _open(self) -> str:
        return str(
            self.stub.OpenSession(pb.OpenSessionRequest(model="tiny-lstm")).session.session_id
        )

    def _step(self, sid: str, i: int) -> bytes:
        req = pb.StepRequest(session_id=sid, seq=3 * i, inputs=to_tensor(self.inputs[i]))
        return bytes(self.stub.Step(req, timeout=10).outputs.raw_data)

    def check(self) -> None:
        """Step once more; the outputs must equal the reference run's bit for bit."""
        i = self.done % len(self.inputs)
        if i == 0 and self.done:
            self.sid = self._open()  # the reference ran out: start the sequence again
        assert self._step(self.sid, i) == self.expected[i], f"bystander chunk {i} differs"
        self.done += 1


def _status(call: Any) -> grpc.StatusCode:
    try:
        call.result(timeout=30)
    except grpc.FutureTimeoutError:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_generated_requests_get_defined_statuses(server_thread_factory: Any) -> None:
    running = server_thread_factory(max_sessions=100_000)
    channel = grpc.insecure_channel(running.address)
    stub = pb_grpc.InferenceServiceStub(channel)
    raw = {
        m: channel.unary_unary(SERVICE + m, request_serializer=None, response_deserializer=None)
        for m in METHODS
    }
    health = health_pb2_grpc.HealthStub(channel)
    bystander = Bystander(stub, 60)
    sent: dict[str, int] = {}
    undefined: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(batches)
    def run(batch: tuple[list[tuple[str, Any]], list[tuple[str, bytes]], list[Any]]) -> None:
        unary, junk, streamed = batch
        live = [
            stub.OpenSession(pb.OpenSessionRequest(model=gen.MODELS[k % 3])).session.session_id
            for k in range(gen.LIVE)
        ]
        calls = [(m, getattr(stub, m).future(_fill(r, live), timeout=30)) for m, r in unary]
        calls += [(m + " (raw bytes)", raw[m].future(data, timeout=30)) for m, data in junk]

        def stream() -> Iterator[pb.StreamRequest]:
            yield from (_fill(r, live) for r in streamed)

        replies = stub.Stream(stream(), timeout=30)
        try:
            for reply in replies:
                if reply.WhichOneof("result") == "error" and reply.error.code in UNDEFINED_INBAND:
                    undefined.append(f"Stream in-band {reply.error.code}: {reply.error.message}")
        except grpc.RpcError as exc:
            if exc.code() in UNDEFINED:
                undefined.append(f"Stream: {exc.code()} {exc.details()}")
        for method, call in calls:
            code = _status(call)
            if code in UNDEFINED:
                undefined.append(f"{method}: {code} {call.exception()}")
            sent[code.name] = sent.get(code.name, 0) + 1
        sent["Stream messages"] = sent.get("Stream messages", 0) + len(streamed)
        for sid in live:
            _status(stub.CloseSession.future(pb.CloseSessionRequest(session_id=sid)))
        assert not undefined, undefined[:5]
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        bystander.check()

    try:
        run()
    finally:
        channel.close()
    total = sum(sent.values())
    print(f"generated requests by outcome: {sorted(sent.items())}; total {total}")
    assert total >= 2_500, sent
    # The generators reach the deep paths, not only the refusals.
    assert sent["OK"] >= 300 and sent["INVALID_ARGUMENT"] >= 300, sent
