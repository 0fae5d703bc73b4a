"""What ``rnnserve bench`` offers a server and what it measured: the configuration, the run
(open sessions, closed loops through the window, close sessions) and its result."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import ROUTE_HEADER, route_of

from .._routing import new_route_key
from ._bench_loops import (
    BenchError,
    Channel,
    DedicatedStream,
    SharedStream,
    Window,
    frame_loop,
    sample_inputs,
    session_loop,
)

if TYPE_CHECKING:
    from rnnserve.v1.rnnserve_pb2_grpc import InferenceServiceAsyncStub

_T = TypeVar("_T")
#: Seconds to wait for the server before declaring it unreachable.
_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LoadConfig:
    """What to offer: ``sessions`` sessions in closed loops on ``streams`` Stream calls (0: one
    per loop). A loop is one session, or with ``frame`` K > 0 a group of K sessions whose chunks
    travel in one message (a frame): ``sessions`` / K frames in flight."""

    target: str
    model: str
    version: str = ""
    sessions: int = 1
    streams: int = 0
    chunk: int = 1
    #: Sessions per message (a StepFrame); 0 sends one session's chunk per message.
    frame: int = 0
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
            raise ValueError(f"--streams must be 0 (one per loop) or more, got {self.streams}")
        if self.chunk < 1:
            raise ValueError(f"--chunk must be at least 1, got {self.chunk}")
        if self.frame < 0:
            raise ValueError(
                f"--frame must be 0 (one session per message) or more, got {self.frame}"
            )
        if self.frame and self.sessions % self.frame:
            raise ValueError(
                f"--sessions ({self.sessions}) must be a multiple of --frame ({self.frame}): "
                "each frame carries its own sessions"
            )
        if self.steps < 0:
            raise ValueError(f"--steps must not be negative, got {self.steps}")
        if self.steps == 0 and self.seconds <= 0:
            raise ValueError(f"--seconds must be positive, got {self.seconds}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must not be negative, got {self.warmup}")
        if not self.model:
            raise ValueError("--model must name a model the server serves")

    @property
    def loops(self) -> int:
        """Messages in flight: one per session, or one per frame."""
        return self.sessions // self.frame if self.frame else self.sessions


@dataclass(frozen=True)
class LoadResult:
    """What one run measured. Latencies (per message) in microseconds, times in seconds."""

    config: LoadConfig
    model_version: str
    #: Replies (one per message: a session's chunk or a frame) inside the measured window.
    messages: int
    #: Session-steps applied in those replies (without a frame's failed entries).
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
        """Applied (session-)steps per second of window."""
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


async def _open(
    stub: InferenceServiceAsyncStub, config: LoadConfig
) -> tuple[pb.ModelInfo, list[pb.SessionInfo], list[str]]:
    """The model's info, the sessions, and a route key per stream; loop i's sessions are
    opened with key i mod len(keys) (rnnserve.proto, Routing: behind a proxy, the sessions of a
    stream are opened where the stream goes)."""
    try:
        info = (
            await stub.GetModel(
                pb.GetModelRequest(model=config.model, version=config.version),
                timeout=_CONNECT_TIMEOUT_S,
                wait_for_ready=True,
            )
        ).model
        lanes = config.loops if config.streams == 0 else min(config.streams, config.loops)
        keys = [new_route_key() for _ in range(lanes)]
        per_loop = config.frame or 1
        opened = await asyncio.gather(
            *(
                stub.OpenSession(
                    pb.OpenSessionRequest(model=config.model, version=info.version),
                    timeout=_CONNECT_TIMEOUT_S,
                    metadata=((ROUTE_HEADER, keys[(i // per_loop) % lanes]),),
                )
                for i in range(config.sessions)
            )
        )
    except grpc.aio.AioRpcError as exc:
        raise BenchError(f"{config.target}: {exc.code().name}: {exc.details()}") from None
    return info, [o.session for o in opened], keys


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
        info, sessions, keys = await _open(stub, config)
        rng = np.random.default_rng(config.seed)
        routes = [((ROUTE_HEADER, key),) for key in keys]
        lanes: list[Channel]
        if config.streams == 0:
            lanes = [DedicatedStream(stub, route) for route in routes]
        else:
            lanes = [SharedStream(stub, route) for route in routes]
        window = Window(on_window_start, on_window_stop)
        latencies: list[list[int]] = [[] for _ in range(config.loops)]
        errors: dict[str, int] = {}
        loops = []
        for i, lat in enumerate(latencies):
            lane = lanes[i % len(lanes)]
            if config.frame:
                group = sessions[i * config.frame : (i + 1) * config.frame]
                inputs = sample_inputs(info, config.chunk, rng, rows=config.frame)
                run = frame_loop(
                    lane, group, inputs, config.chunk, config.steps, window, lat, errors
                )
            else:
                inputs = sample_inputs(info, config.chunk, rng)
                run = session_loop(
                    lane, sessions[i], inputs, config.chunk, config.steps, window, lat, errors
                )
            loops.append(asyncio.create_task(run))
        try:
            await _drive_window(config, window, loops)
            counts = await asyncio.gather(*loops)
        except grpc.aio.AioRpcError as exc:
            raise BenchError(f"stream failed: {exc.code().name}: {exc.details()}") from None
        finally:
            window.stop()
            for task in loops:
                task.cancel()
        for lane in lanes:
            await lane.close()
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
        raise BenchError("no message completed inside the measured window; lengthen --seconds")
    p50, p90, p99 = np.percentile(all_ns, [50, 90, 99]) / 1e3
    return LoadResult(
        config=config,
        model_version=f"{info.name}:{info.version}",
        messages=sum(c[0] for c in counts),
        steps=sum(c[1] for c in counts),
        errors=errors,
        window_s=(window.stopped_ns - window.started_ns) / 1e9,
        p50_us=float(p50),
        p90_us=float(p90),
        p99_us=float(p99),
        max_us=float(all_ns.max()) / 1e3,
        client_cpu_s=window.cpu_stop - window.cpu_start,
    )


async def _drive_window(
    config: LoadConfig, window: Window, loops: list[asyncio.Task[tuple[int, int]]]
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
