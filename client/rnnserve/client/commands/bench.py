"""``rnnserve bench``: a closed-loop load generator for any rnnserve server.

N sessions, each opened with its own ``OpenSession``; each sends one chunk, waits for its reply,
then sends the next (closed loop), so the offered load follows the server's speed. By default
every session gets its own bidirectional ``Stream`` call, all calls on one channel (one HTTP/2
connection): what an app does that gives each of its users a stream, and the layout the
reference figures in ARCHITECTURE.md were measured with. ``--streams K`` multiplexes the
sessions over K ``Stream`` calls instead (a gateway fanning many users into few streams).

A round trip is timed from just before the request is handed to gRPC to just after its reply
comes back (``time.perf_counter_ns``); the percentiles cover round trips sent and answered
inside the window, the rates every reply that arrived inside it. Sessions run ``--warmup``
seconds unmeasured, then the measured window opens: ``--seconds`` long, or until every
session has applied ``--steps`` steps. Callers that sample the server's CPU
(bench/step_latency.py) get callbacks at the window's edges. Depends only on grpcio,
protobuf, numpy and rnnserve.v1/rnnserve.wire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
import numpy as np
from rnnserve import wire
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import ROUTE_HEADER, route_of

from .._routing import Metadata, new_route_key

if TYPE_CHECKING:
    from rnnserve.v1.rnnserve_pb2_grpc import InferenceServiceAsyncStub

_T = TypeVar("_T")
#: Distinct pre-built chunks each session cycles through (inputs vary, encoding stays off the
#: measured path).
_CHUNKS_PER_SESSION = 8
#: Seconds to wait for the server before declaring it unreachable.
_CONNECT_TIMEOUT_S = 10.0


class BenchError(RuntimeError):
    """The benchmark cannot run or its stream broke; the message says why."""


@dataclass(frozen=True)
class LoadConfig:
    """What to offer: ``sessions`` closed loops on ``streams`` Stream calls (0: one each)."""

    target: str
    model: str
    version: str = ""
    sessions: int = 1
    streams: int = 0
    chunk: int = 1
    #: Length of the measured window, seconds (used when ``steps`` is 0).
    seconds: float = 5.0
    #: When > 0: the window lasts until every session has applied this many steps.
    steps: int = 0
    #: Unmeasured seconds before the window, so connections and caches are warm.
    warmup: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError saying which setting to fix."""
        if self.sessions < 1:
            raise ValueError(f"--sessions must be at least 1, got {self.sessions}")
        if self.streams < 0:
            raise ValueError(f"--streams must be 0 (one per session) or more, got {self.streams}")
        if self.chunk < 1:
            raise ValueError(f"--chunk must be at least 1, got {self.chunk}")
        if self.steps < 0:
            raise ValueError(f"--steps must not be negative, got {self.steps}")
        if self.steps == 0 and self.seconds <= 0:
            raise ValueError(f"--seconds must be positive, got {self.seconds}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must not be negative, got {self.warmup}")
        if not self.model:
            raise ValueError("--model must name a model the server serves")


@dataclass(frozen=True)
class LoadResult:
    """What one run measured. Latencies in microseconds, times in seconds."""

    config: LoadConfig
    model_version: str
    #: Replies that carried outputs within the measured window.
    messages: int
    #: Steps in those replies (messages x chunk).
    steps: int
    #: In-band errors within the window, by status code name.
    errors: dict[str, int]
    window_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    #: This (client) process's CPU time over the window, user + system.
    client_cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        """Applied steps per second of window."""
        return self.steps / self.window_s if self.window_s > 0 else 0.0

    @property
    def messages_per_s(self) -> float:
        """Stream messages (round trips) per second of window."""
        return self.messages / self.window_s if self.window_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, including the derived rates."""
        data = asdict(self)
        data["steps_per_s"] = self.steps_per_s
        data["messages_per_s"] = self.messages_per_s
        return data


class _Window:
    """The measured window: sessions record only while it is open; callbacks at its edges."""

    def __init__(self, on_start: Callable[[], None] | None, on_stop: Callable[[], None] | None):
        self.open = False
        self.stopped = False
        self.started_ns = 0
        self.stopped_ns = 0
        self.cpu_start = 0.0
        self.cpu_stop = 0.0
        self._on_start = on_start
        self._on_stop = on_stop

    def start(self) -> None:
        if self._on_start is not None:
            self._on_start()
        self.cpu_start = _own_cpu_s()
        self.started_ns = time.perf_counter_ns()
        self.open = True

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped_ns = time.perf_counter_ns()
        self.cpu_stop = _own_cpu_s()
        self.open = False
        self.stopped = True
        if self._on_stop is not None:
            self._on_stop()


class _Channel(Protocol):
    """One way of carrying a session's round trips: a dedicated or a shared Stream call."""

    async def round_trip(self, request: pb.StreamRequest) -> pb.StreamResponse: ...

    async def close(self) -> None: ...


class _DedicatedStream:
    """A Stream call carrying one session: write, then read its reply."""

    def __init__(self, stub: InferenceServiceAsyncStub, metadata: Metadata) -> None:
        self._call = stub.Stream(metadata=metadata)

    async def round_trip(self, request: pb.StreamRequest) -> pb.StreamResponse:
        await self._call.write(request)
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise BenchError("the server ended a stream while a step was in flight")
        assert isinstance(reply, pb.StreamResponse)
        return reply

    async def close(self) -> None:
        await self._call.done_writing()
        while await self._call.read() is not grpc.aio.EOF:
            pass


class _SharedStream:
    """A Stream call shared by several sessions: one writer, one reader matching request ids."""

    def __init__(self, stub: InferenceServiceAsyncStub, metadata: Metadata) -> None:
        self._outbox: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[pb.StreamResponse]] = {}
        self._next_id = 1
        self._call = stub.Stream(metadata=metadata)
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    async def _write(self) -> None:
        while (request := await self._outbox.get()) is not None:
            await self._call.write(request)
        await self._call.done_writing()

    async def _read(self) -> None:
        error = BenchError("a shared stream ended with steps in flight")
        try:
            while (reply := await self._call.read()) is not grpc.aio.EOF:
                assert isinstance(reply, pb.StreamResponse)
                future = self._pending.pop(reply.request_id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = BenchError(f"shared stream failed: {exc.code().name}: {exc.details()}")
        finally:
            # Every session waiting on this stream learns why it broke.
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    async def round_trip(self, request: pb.StreamRequest) -> pb.StreamResponse:
        request.request_id = self._next_id
        future: asyncio.Future[pb.StreamResponse] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        self._next_id += 1
        self._outbox.put_nowait(request)
        return await future

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        await asyncio.gather(self._writer, self._reader)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sample_chunks(info: pb.ModelInfo, chunk: int, rng: np.random.Generator) -> list[pb.Tensor]:
    """Pre-encoded input chunks of ``chunk`` steps that fit the model's input spec."""
    if info.input_kind == pb.INPUT_KIND_TOKENS:
        vocab = len(info.vocabulary)
        if vocab < 1:
            raise BenchError(f"token model {info.name} lists no vocabulary")
        return [
            wire.to_tensor(rng.integers(0, vocab, size=chunk, dtype=np.int64))
            for _ in range(_CHUNKS_PER_SESSION)
        ]
    dims = [int(d) for d in info.input.shape[1:]]
    if any(d < 1 for d in dims):
        raise BenchError(f"model {info.name} input shape {list(info.input.shape)} is not [-1, F]")
    dtype = wire.dtype_from_proto(info.input.dtype) if info.input.dtype else np.dtype("<f4")
    return [
        wire.to_tensor(rng.standard_normal((chunk, *dims)).astype(dtype))
        for _ in range(_CHUNKS_PER_SESSION)
    ]


async def _session_loop(
    channel: _Channel,
    session: pb.SessionInfo,
    chunks: list[pb.Tensor],
    config: LoadConfig,
    window: _Window,
    latencies: list[int],
    errors: dict[str, int],
) -> int:
    """Closed loop of one session until the window closes; returns measured messages."""
    request = pb.StreamRequest()
    request.step.session_id = session.session_id
    seq = session.next_seq
    measured = 0
    i = 0
    while not window.stopped:
        if config.steps and measured * config.chunk >= config.steps:
            break
        request.step.seq = seq
        request.step.inputs.CopyFrom(chunks[i % len(chunks)])
        i += 1
        t0 = time.perf_counter_ns()
        reply = await channel.round_trip(request)
        t1 = time.perf_counter_ns()
        counted = window.open and not window.stopped
        if reply.HasField("error"):
            code = _code_name(reply.error.code)
            if counted:
                errors[code] = errors.get(code, 0) + 1
            if reply.error.code != grpc.StatusCode.FAILED_PRECONDITION.value[0]:
                raise BenchError(
                    f"session {session.session_id[:8]}…: {code}: {reply.error.message}"
                )
            seq = reply.error.next_seq  # a seq error tells where to resume
            continue
        seq = reply.step.next_seq
        if counted:
            measured += 1
            # A round trip sent before the window opened belongs to the warmup's conditions
            # (connection and stream set-up): it counts as throughput, not as a latency sample.
            if t0 >= window.started_ns:
                latencies.append(t1 - t0)
    return measured


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return f"CODE_{code}"


async def run_load(
    config: LoadConfig,
    on_window_start: Callable[[], None] | None = None,
    on_window_stop: Callable[[], None] | None = None,
) -> LoadResult:
    """Open the sessions, run the closed loops, close the sessions, return what was measured.

    Raises BenchError when the server cannot be reached, the model is unknown, or a stream or
    session fails outright; per-message seq errors are counted in ``errors`` and resumed from.
    """
    config.validate()
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(config.target, options=options) as channel:
        stub: InferenceServiceAsyncStub = pb_grpc.InferenceServiceStub(channel)
        try:
            info = (
                await stub.GetModel(
                    pb.GetModelRequest(model=config.model, version=config.version),
                    timeout=_CONNECT_TIMEOUT_S,
                    wait_for_ready=True,
                )
            ).model
            # A route key per stream (rnnserve.proto, Routing): behind a proxy, the sessions of
            # a stream are opened where the stream goes.
            lanes = config.sessions if config.streams == 0 else config.streams
            keys = [new_route_key() for _ in range(min(lanes, config.sessions))]
            opened = await asyncio.gather(
                *(
                    stub.OpenSession(
                        pb.OpenSessionRequest(model=config.model, version=info.version),
                        timeout=_CONNECT_TIMEOUT_S,
                        metadata=((ROUTE_HEADER, keys[i % len(keys)]),),
                    )
                    for i in range(config.sessions)
                )
            )
        except grpc.aio.AioRpcError as exc:
            raise BenchError(f"{config.target}: {exc.code().name}: {exc.details()}") from None
        sessions = [o.session for o in opened]
        rng = np.random.default_rng(config.seed)
        chunks = [_sample_chunks(info, config.chunk, rng) for _ in sessions]
        channels: list[_Channel]
        routes = [((ROUTE_HEADER, key),) for key in keys]
        if config.streams == 0:
            channels = [_DedicatedStream(stub, route) for route in routes]
        else:
            shared: list[_Channel] = [_SharedStream(stub, route) for route in routes]
            channels = [shared[i % len(shared)] for i in range(len(sessions))]
        window = _Window(on_window_start, on_window_stop)
        latencies: list[list[int]] = [[] for _ in sessions]
        errors: dict[str, int] = {}
        loops = [
            asyncio.create_task(_session_loop(ch, s, c, config, window, lat, errors))
            for ch, s, c, lat in zip(channels, sessions, chunks, latencies, strict=True)
        ]
        try:
            await _drive_window(config, window, loops)
            counts = await asyncio.gather(*loops)
        except grpc.aio.AioRpcError as exc:
            raise BenchError(f"stream failed: {exc.code().name}: {exc.details()}") from None
        finally:
            window.stop()
            for task in loops:
                task.cancel()
        for ch in dict.fromkeys(channels):  # each distinct call once, in order
            await ch.close()
        await asyncio.gather(
            *(
                stub.CloseSession(
                    pb.CloseSessionRequest(session_id=s.session_id),
                    metadata=((ROUTE_HEADER, route_of(s.session_id)),),
                )
                for s in sessions
            ),
            return_exceptions=True,  # a session the server already dropped is no failure here
        )
    all_ns = np.concatenate([np.asarray(x, dtype=np.int64) for x in latencies])
    if all_ns.size == 0:
        raise BenchError("no step completed inside the measured window; lengthen --seconds")
    p50, p90, p99 = np.percentile(all_ns, [50, 90, 99]) / 1e3
    messages = int(sum(counts))
    return LoadResult(
        config=config,
        model_version=f"{info.name}:{info.version}",
        messages=messages,
        steps=messages * config.chunk,
        errors=errors,
        window_s=(window.stopped_ns - window.started_ns) / 1e9,
        p50_us=float(p50),
        p90_us=float(p90),
        p99_us=float(p99),
        max_us=float(all_ns.max()) / 1e3,
        client_cpu_s=window.cpu_stop - window.cpu_start,
    )


async def _drive_window(
    config: LoadConfig, window: _Window, loops: list[asyncio.Task[int]]
) -> None:
    """Open the window after the warmup and close it after ``seconds`` or when loops finish."""
    await asyncio.sleep(config.warmup)
    window.start()
    if config.steps:
        await asyncio.gather(*loops)
    else:
        done, _ = await asyncio.wait(loops, timeout=config.seconds, return_when="FIRST_EXCEPTION")
        for task in done:
            task.result()  # a loop that failed early: surface its error now
    window.stop()


def run_event_loop(main: Coroutine[Any, Any, _T], use_uvloop: bool = False) -> _T:
    """Run a coroutine on a fresh asyncio or uvloop event loop; BenchError without uvloop."""
    if not use_uvloop:
        return asyncio.run(main)
    try:
        import uvloop
    except ModuleNotFoundError:
        main.close()
        raise BenchError("--uvloop needs uvloop: pip install 'rnnserve[fast]'") from None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def format_result(result: LoadResult) -> str:
    """A few human-readable lines about one run."""
    c = result.config
    layout = "one stream each" if c.streams == 0 else f"{min(c.streams, c.sessions)} stream(s)"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(result.errors.items())) or "0"
    per_step = 1e6 * result.client_cpu_s / result.steps if result.steps else 0.0
    return "\n".join(
        [
            f"rnnserve bench  {result.model_version} at {c.target}  "
            f"{c.sessions} session(s), {layout}, chunk {c.chunk}",
            f"  window {result.window_s:.2f} s  messages {result.messages:,}  "
            f"steps {result.steps:,}  errors {errors}",
            f"  round trip  p50 {result.p50_us:,.0f} µs  p90 {result.p90_us:,.0f} µs  "
            f"p99 {result.p99_us:,.0f} µs  max {result.max_us:,.0f} µs",
            f"  throughput  {result.steps_per_s:,.0f} steps/s  "
            f"({result.messages_per_s:,.0f} messages/s)  client CPU {per_step:.1f} µs/step",
        ]
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the bench options to the sub-command's parser."""
    parser.add_argument("--server", default="127.0.0.1:50051", help="host:port of the server")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions")
    parser.add_argument(
        "--streams",
        type=int,
        default=0,
        help="Stream calls the sessions share (default 0: one stream per session)",
    )
    parser.add_argument("--chunk", type=int, default=1, help="steps per message")
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--seconds", type=float, default=5.0, help="measured window, seconds")
    span.add_argument("--steps", type=int, default=0, help="measured steps per session instead")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Run one load test and print its result; 1 on errors, 2 on bad options."""
    config = LoadConfig(
        target=args.server,
        model=args.model,
        version=args.version,
        sessions=args.sessions,
        streams=args.streams,
        chunk=args.chunk,
        seconds=args.seconds,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
    )
    try:
        config.validate()
    except ValueError as exc:
        print(f"rnnserve bench: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_event_loop(run_load(config), use_uvloop=args.uvloop)
    except BenchError as exc:
        print(f"rnnserve bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))
    if result.errors:
        print(f"rnnserve bench: {sum(result.errors.values())} step(s) failed", file=sys.stderr)
        return 1
    return 0
