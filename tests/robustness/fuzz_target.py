"""Coverage-guided fuzz target (atheris, libFuzzer) over the server's request decoders.

Each input is one request to a real rnnserve server running in this process on 127.0.0.1:0
(the test model repository, generated in a temporary folder): byte 0 picks the method (every
unary method of rnnserve.v1.InferenceService, or Stream), byte 1 whether to aim the request at
one of a few live sessions, the rest is the request's protobuf encoding, sent as raw bytes
through a real channel so that bytes which do not decode reach the server too. A Stream input
carries up to 8 messages separated by ``\\xff\\xfe``. The server's Python code (rnnserve.*) is
instrumented, so libFuzzer keeps the inputs that reach new branches of the decoders.

A run fails (and libFuzzer saves the input) when a call ends with UNKNOWN, INTERNAL or a
timeout, a Stream answers one in-band, health stops reporting SERVING, or a bystander session
stepped every ``CHECK_EVERY`` inputs stops producing the reference outputs bit for bit.

    python tests/robustness/fuzz_target.py -runs=100000 corpus/     # a longer campaign
    python tests/robustness/fuzz_target.py -runs=10000 -seed=1 corpus/   # what CI runs

An empty corpus folder is seeded with one well-formed request per method first.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["rnnserve"]):
    import grpc
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from rnnserve.server.app import RnnServer
    from rnnserve.server.settings import Settings
    from rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.wire import to_tensor

    from tests.support.modelgen import make_repo

UNDEFINED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
METHODS = {
    "ListModels": pb.ListModelsRequest,
    "GetModel": pb.GetModelRequest,
    "OpenSession": pb.OpenSessionRequest,
    "GetSession": pb.GetSessionRequest,
    "Step": pb.StepRequest,
    "CloseSession": pb.CloseSessionRequest,
    "ResetSession": pb.ResetSessionRequest,
    "ForkSession": pb.ForkSessionRequest,
    "GetState": pb.GetStateRequest,
    "PutState": pb.PutStateRequest,
    "Stream": pb.StreamRequest,
}
NAMES = list(METHODS)
SEPARATOR = b"\xff\xfe"
MODELS = ("tiny-gru", "tiny-lstm", "tiny-char")
LIVE = 6
CHECK_EVERY = 500


class Harness:
    """The server, a channel to it, the live sessions and the bystander."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        repo = make_repo(Path(self.tmp.name) / "models")
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        settings = Settings(port=0, metrics_port=-1, models=repo, reload_interval_s=0)
        self.server = RnnServer(settings)
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.raw = {
            name: (
                self.channel.stream_stream(f"/rnnserve.v1.InferenceService/{name}")
                if name == "Stream"
                else self.channel.unary_unary(f"/rnnserve.v1.InferenceService/{name}")
            )
            for name in NAMES
        }
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.live: list[str] = []
        self.runs = 0
        self.codes: dict[str, int] = {}
        rng = np.random.default_rng(3)
        self.inputs = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(64)]
        reference = self.open("tiny-gru")
        self.expected = [self.bystander_step(reference, i) for i in range(len(self.inputs))]
        self.bystander = self.open("tiny-gru")
        self.checked = 0
        self.refresh()

    def call(self, name: str, request: Any) -> Any:
        return self.raw[name](request.SerializeToString(), timeout=10)

    def open(self, model: str) -> str:
        reply = pb.OpenSessionResponse.FromString(
            self.call("OpenSession", pb.OpenSessionRequest(model=model))
        )
        return reply.session.session_id

    def bystander_step(self, sid: str, i: int) -> bytes:
        req = pb.StepRequest(session_id=sid, seq=2 * i, inputs=to_tensor(self.inputs[i]))
        return bytes(pb.StepResponse.FromString(self.call("Step", req)).outputs.raw_data)

    def refresh(self) -> None:
        for sid in self.live:
            with contextlib.suppress(grpc.RpcError):  # the fuzzer may have closed it
                self.call("CloseSession", pb.CloseSessionRequest(session_id=sid))
        self.live = [self.open(MODELS[k % 3]) for k in range(LIVE)]

    def check(self) -> None:
        status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, "the server stopped SERVING"
        i = self.checked % len(self.inputs)
        if i == 0 and self.checked:
            self.bystander = self.open("tiny-gru")
        got = self.bystander_step(self.bystander, i)
        assert got == self.expected[i], f"bystander outputs differ at chunk {i}"
        self.checked += 1
        print(f"fuzz: {self.runs} runs, bystander checks {self.checked}, codes {self.codes}")
        sys.stdout.flush()

    def aim(self, body: bytes, flags: int, kind: type[Any]) -> bytes:
        """``body``, with its session id replaced by a live one when ``flags`` says so and the
        bytes decode."""
        if not flags & 1:
            return body
        try:
            msg = kind.FromString(body)
        except Exception:
            return body
        target = msg.step if kind is pb.StreamRequest else msg
        if hasattr(target, "session_id"):
            target.session_id = self.live[(flags >> 1) % LIVE]
        return bytes(msg.SerializeToString())

    def one(self, data: bytes) -> None:
        # Every input is a request: one too short for its method and flags bytes is padded, so
        # the run count is libFuzzer's own (skipping them made 10,000 requests out of 10,100
        # runs depend on how many short inputs the mutator happened to make).
        data = data.ljust(2, b"\0")
        name = NAMES[data[0] % len(NAMES)]
        flags, body = data[1], data[2:]
        kind = METHODS[name]
        if name == "Stream":
            messages = [self.aim(m, flags, kind) for m in body.split(SEPARATOR)[:8]]
            try:
                for reply_bytes in self.raw[name](iter(messages), timeout=10):
                    reply = pb.StreamResponse.FromString(reply_bytes)
                    if reply.WhichOneof("result") == "error":
                        code = reply.error.code
                        assert code not in (2, 13), f"Stream in-band {code}: {reply.error.message}"
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
        else:
            try:
                self.raw[name](self.aim(body, flags, kind), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        assert code not in UNDEFINED, f"{name} ended with {code}"
        self.runs += 1
        if self.runs % CHECK_EVERY == 0:
            self.check()
        if self.runs % 200 == 0:
            self.refresh()


def seeds() -> list[bytes]:
    """One well-formed request per method (and a few variants) to start the corpus."""
    x = to_tensor(np.ones((2, 3), np.float32))
    snap = pb.SessionSnapshot(model="tiny-gru", version="1", next_seq=2, last_seq=0)
    snap.state["h"].CopyFrom(to_tensor(np.zeros((2, 8), np.float32)))
    snap.last_outputs.CopyFrom(to_tensor(np.zeros((2, 2), np.float32)))
    open_state = pb.OpenSessionRequest(model="tiny-lstm")
    for name in ("h", "c"):
        open_state.initial_state[name].CopyFrom(to_tensor(np.zeros((2, 8), np.float32)))
    requests: list[tuple[str, Any]] = [
        ("ListModels", pb.ListModelsRequest()),
        ("GetModel", pb.GetModelRequest(model="tiny-char")),
        ("OpenSession", pb.OpenSessionRequest(model="tiny-gru", version="1")),
        ("OpenSession", open_state),
        ("GetSession", pb.GetSessionRequest(session_id="x")),
        ("Step", pb.StepRequest(session_id="x", seq=0, inputs=x, want_state=True)),
        ("Step", pb.StepRequest(session_id="x", inputs=to_tensor(np.arange(4, dtype=np.int64)))),
        ("CloseSession", pb.CloseSessionRequest(session_id="x")),
        ("ResetSession", pb.ResetSessionRequest(session_id="x")),
        ("ForkSession", pb.ForkSessionRequest(session_id="x")),
        ("GetState", pb.GetStateRequest(session_id="x")),
        ("PutState", pb.PutStateRequest(snapshot=snap)),
        ("PutState", pb.PutStateRequest(session_id="x", snapshot=snap)),
    ]
    out = [bytes([NAMES.index(n), 1]) + r.SerializeToString() for n, r in requests]
    stream = [
        pb.StreamRequest(step=pb.StepRequest(session_id="x", seq=i, inputs=x), request_id=i)
        for i in range(3)
    ]
    out.append(
        bytes([NAMES.index("Stream"), 3]) + SEPARATOR.join(m.SerializeToString() for m in stream)
    )
    return out


def main() -> None:
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for folder in corpus:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        if not any(path.iterdir()):
            for i, seed in enumerate(seeds()):
                (path / f"seed-{i:02d}").write_bytes(seed)
    harness = Harness()

    def test_one_input(data: bytes) -> None:
        harness.one(data)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
