"""The transport floor: a bare grpc.aio InferenceService that answers without running a model.

It speaks enough of rnnserve.v1 for ``rnnserve bench`` to run against it unchanged
(GetModel, ListModels, OpenSession, CloseSession, Stream) and answers every Stream message with
a StreamResponse of the same size the real server sends: outputs float32 ``[T, outputs]``
(zeros) for a chunk of T steps, the session id, seq and next seq. No sessions are kept, no
input is decoded and no model runs, so what it costs per message is what the gRPC stack and
protobuf cost: the floor under any Python server on the same stack. A frame (a message carrying
N sessions' chunks of T steps) gets a FrameResponse of the real size: outputs float32
``[N, T, outputs]`` (zeros) and each entry's next seq.

With ``--run-model`` it runs the model on frames: each frame's entries are one batch through
rnnserve's own ``Engine`` (one intra-op thread, pre-bound buffers), each session's state kept in
a ``SlotPool`` row found by one dict lookup (a new row of zeros for an id it has not seen), and
the reply carries the real outputs. No seq is checked, nothing is cached for a retry, nothing is
counted: it is the floor of any server that runs the model on frames in-process on this stack
(transport, decode, gather, the run, scatter, encode), the work rnnserve cannot skip.

With ``--busy-us N`` it spins for N µs on each message before answering: a stand-in for a
model run of that length that keeps the CPU busy as a run does, but touches no memory. Set to
the model run's own time, it is the floor of any server that runs that model in-process on
this stack.

Usage: ``python bench/echo_server.py --model-dir models/<name>/<version> [--port 0] [--uvloop]
[--busy-us N | --run-model]`` (the version folder holds the manifest.json whose shapes the echo
imitates).
Prints ``listening on HOST:PORT`` once it serves; SIGTERM or SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
from rnnserve.manifest import Manifest, ManifestError, load_manifest
from rnnserve.server.engine import CPU, Engine
from rnnserve.server.state import SlotPool
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import from_tensor

#: Longest chunk the echo accepts, as the real server's default might; only for ModelInfo.
_MAX_CHUNK = 1024


def model_info(manifest: Manifest) -> pb.ModelInfo:
    """The ModelInfo the real server would describe this manifest with (provider: none)."""
    tokens = manifest.input_kind == "tokens"
    info = pb.ModelInfo(
        name=manifest.name,
        version=manifest.version,
        versions=[manifest.version],
        cell=manifest.cell,
        input_kind=pb.INPUT_KIND_TOKENS if tokens else pb.INPUT_KIND_FEATURES,
        output_kind=(
            pb.OUTPUT_KIND_LOGITS if manifest.output_kind == "logits" else pb.OUTPUT_KIND_REGRESSION
        ),
        input=pb.TensorSpec(
            name=manifest.input_name,
            dtype=pb.DTYPE_INT64 if tokens else pb.DTYPE_FLOAT32,
            shape=[-1] if tokens else [-1, manifest.input_size],
        ),
        output=pb.TensorSpec(
            name=manifest.output_name, dtype=pb.DTYPE_FLOAT32, shape=[-1, manifest.output_size]
        ),
        states=[
            pb.TensorSpec(name=s.name, dtype=pb.DTYPE_FLOAT32, shape=s.shape)
            for s in manifest.states
        ],
        vocabulary=manifest.vocabulary or [],
        max_chunk_length=_MAX_CHUNK,
        provider="none (echo server)",
    )
    return info


def _spin(seconds: float) -> None:
    """Keep the CPU busy for ``seconds`` (a model run's stand-in; a sleep would idle it)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class FloorModel:
    """The least a server does to run a frame: one row of state per session id, one batch."""

    def __init__(self, version_dir: Path, manifest: Manifest) -> None:
        self.engine = Engine(version_dir, manifest, [CPU])
        self.pool = SlotPool(manifest.states, max_slots=1 << 16)
        self.rows: dict[str, int] = {}

    def run(self, frame: pb.StepFrame) -> tuple[bytes, int]:
        """The outputs' bytes (float32 ``[N, T, outputs]``) of a frame's entries, and T."""
        ids = list(frame.session_ids)
        rows = self.rows
        found = list(map(rows.get, ids))
        if None in found:
            for sid in ids:
                if sid not in rows:
                    rows[sid] = self.pool.allocate()
            found = list(map(rows.get, ids))
        slots = np.fromiter(found, np.intp, len(found))
        inputs = from_tensor(frame.inputs)  # [N, T] or [N, T, F]
        x = np.ascontiguousarray(inputs.swapaxes(0, 1))
        lengths = np.full(len(ids), x.shape[0], dtype=np.int32)
        y, new = self.engine.run(x, self.pool.gather(slots), lengths)
        outputs = y.swapaxes(0, 1).tobytes()  # C order: [N, T, outputs]
        self.pool.scatter(slots, new)
        return outputs, int(x.shape[0])


class EchoServicer(pb_grpc.InferenceServiceServicer):
    """Answers like rnnserve without state or compute; everything else is UNIMPLEMENTED."""

    def __init__(
        self, info: pb.ModelInfo, busy_s: float = 0.0, model: FloorModel | None = None
    ) -> None:
        self._info = info
        self._busy_s = busy_s
        self._model = model
        self._output_size = int(info.output.shape[-1])
        # Zero outputs per chunk length, built once: encoding is the real server's cost, not
        # the transport's, and the bytes on the wire are the same size either way.
        self._zeros: dict[int, bytes] = {}

    def _outputs(self, steps: int) -> bytes:
        raw = self._zeros.get(steps)
        if raw is None:
            raw = bytes(4 * steps * self._output_size)
            self._zeros[steps] = raw
        return raw

    def _frame_reply(self, request: pb.StreamRequest) -> pb.StreamResponse:
        """A FrameResponse of the real size: outputs float32 ``[N, T, outputs]`` (zeros) and
        every entry's next seq, for a frame whose inputs are ``[N, T]`` or ``[N, T, F]``."""
        frame = request.frame
        rows = len(frame.session_ids)
        if self._model is not None:
            outputs, steps = self._model.run(frame)
        else:
            shape = frame.inputs.shape
            steps = int(shape[1]) if len(shape) > 1 else 1
            outputs = self._outputs(rows * steps)
        return pb.StreamResponse(
            request_id=request.request_id,
            frame=pb.FrameResponse(
                outputs=pb.Tensor(
                    dtype=pb.DTYPE_FLOAT32,
                    shape=(rows, steps, self._output_size),
                    raw_data=outputs,
                ),
                next_seqs=[seq + steps for seq in frame.seqs],
            ),
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._info])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        if request.model != self._info.name or request.version not in ("", self._info.version):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"echo server imitates only {self._info.name}:{self._info.version}",
            )
        return pb.GetModelResponse(model=self._info)

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        session = pb.SessionInfo(
            session_id=secrets.token_urlsafe(16),
            model=self._info.name,
            version=self._info.version,
            states=self._info.states,
        )
        return pb.OpenSessionResponse(session=session)

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse()

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        async for request in request_iterator:
            if request.HasField("frame"):
                if self._busy_s:
                    _spin(self._busy_s)
                yield self._frame_reply(request)
                continue
            step = request.step
            # A chunk is [T, F] or [T] (tokens): T is the first dimension either way.
            steps = int(step.inputs.shape[0]) if step.inputs.shape else 1
            if self._busy_s:
                _spin(self._busy_s)
            yield pb.StreamResponse(
                request_id=request.request_id,
                session_id=step.session_id,
                step=pb.StepResponse(
                    session_id=step.session_id,
                    seq=step.seq,
                    next_seq=step.seq + steps,
                    outputs=pb.Tensor(
                        dtype=pb.DTYPE_FLOAT32,
                        shape=(steps, self._output_size),
                        raw_data=self._outputs(steps),
                    ),
                ),
            )


async def serve(
    manifest: Manifest, host: str, port: int, busy_us: float = 0.0, model: FloorModel | None = None
) -> None:
    """Serve until SIGTERM or SIGINT; prints ``listening on HOST:PORT`` once bound."""
    server = grpc.aio.server()
    servicer = EchoServicer(model_info(manifest), busy_us / 1e6, model)
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"echo_server: cannot bind {host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    """Parse options, load the manifest, serve; one line on stderr for bad input."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", type=Path, required=True, help="a model version folder with manifest.json"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    parser.add_argument(
        "--busy-us",
        type=float,
        default=0.0,
        help="spin this many µs per message before answering, as a model run of that length",
    )
    parser.add_argument(
        "--run-model",
        action="store_true",
        help="run the model on frames (the floor of a server that does), not zeros",
    )
    args = parser.parse_args(argv)
    if not args.busy_us >= 0:
        print(f"echo_server: --busy-us must be 0 or more, not {args.busy_us:g}", file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(args.model_dir)
    except ManifestError as exc:
        print(f"echo_server: {exc}", file=sys.stderr)
        return 2
    model = FloorModel(args.model_dir, manifest) if args.run_model else None
    if args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(manifest, args.host, args.port, args.busy_us, model))
    else:
        asyncio.run(serve(manifest, args.host, args.port, args.busy_us, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
