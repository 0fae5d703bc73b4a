"""Frames against one step per message, and against the echo floor, in one run.

A frame is one Stream message carrying a one-step chunk of each of K sessions (FRAMES.md,
``StreamRequest.frame``); the server runs its entries as one batch and answers with one
``FrameResponse``. This script measures, for GRU and LSTM at hidden 128 and 512
(bench/models.py), frames of K = 8, 64 and 256 sessions beside rnnserve with one step per
message at 64 sessions and beside the echo floor (bench/echo_server.py, which answers frames
and single steps with replies of the real size and runs no model) at 64 sessions. For the
first model (the shipped ``char-gru``) it also measures one step per message at 1, 16, 64
and 256 sessions on both servers and the echo's frames, the points of the latency-vs-throughput
plot.

The load is ``rnnserve bench``'s closed loop (``--frame K``): ``--inflight`` frames in flight,
each on its own Stream with its own K sessions, the next frame of a group sent when its reply is
in (and, for the targets' frame size, one frame alone in flight: as many sessions as the
echo's 64). Per run: session-steps/s, latency p50/p99 per message (a frame's round trip), and the
server process's CPU time per session-step (utime + stime from /proc over the window). All
settings of one model run back to back per round, the order reversed every other round (ABBA),
so each target ratio is taken within a round, then the median over rounds with the range.

Before the servers start, the in-process ONNX Runtime cost at batch K: rnnserve's ``Engine``
(one intra-op thread, as the server) running one step of K sessions back to back, CPU time per
run, median; per session-step that is the run's cost over K.

Targets (issue 11), checked in this run: at K = 64, session-steps/s at least 15x the echo's
one-step-per-message steps/s at 64 sessions; server CPU per session-step at most the
in-process ONNX Runtime cost per session-step at that batch + 3 µs.

Usage: ``python bench/frames.py [--quick] [--out docs/benchmarks.md] [--json PATH]``. A full run
takes about 8 minutes; ``--quick`` about a minute. Writes the ``frames`` section and
docs/img/frames-latency-throughput.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from frames_report import ModelRun, Point, Report, plot, render
from rnnserve.client.commands.bench import BenchError, LoadConfig, run_event_loop, run_load
from rnnserve.manifest import load_manifest
from rnnserve.server.engine import CPU, Engine
from sections import spread, write_section
from servers import ServerProcess, echo_command, rnnserve_command

from models import BenchModel, build_repository

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench/frames.py"


def ort_cost_us(version_dir: Path, batch: int, runs: int) -> float:
    """CPU µs of one Engine run of one step at ``batch`` sessions, back to back, median."""
    manifest = load_manifest(version_dir)
    engine = Engine(version_dir, manifest, [CPU])
    _, states1 = engine.zero_batch()
    rng = np.random.default_rng(batch)
    x: np.ndarray
    if manifest.input_kind == "tokens":
        x = rng.integers(0, manifest.input_size, size=(1, batch), dtype=np.int64)
    else:
        x = rng.standard_normal((1, batch, manifest.input_size)).astype(np.float32)
    axes = {s.input: s.batch_axis for s in manifest.states}
    states = {k: np.repeat(v, batch, axis=axes[k]) for k, v in states1.items()}
    lengths = np.ones(batch, np.int32)
    took = []
    for i in range(runs + runs // 5):
        start = time.process_time_ns()
        engine.run(x, states, lengths)
        if i >= runs // 5:  # the first fifth warms up
            took.append(time.process_time_ns() - start)
    return float(statistics.median(took)) / 1000


def measure(
    server: ServerProcess,
    model: BenchModel,
    sessions: int,
    frame: int,
    args: argparse.Namespace,
) -> Point:
    """One closed-loop run, the server's CPU time sampled at the window's edges."""
    marks: dict[str, float] = {}
    config = LoadConfig(
        target=server.target,
        # The echo imitates the first model only (all of them answer 62 logits a step).
        model=args.echo_model if server.label == "echo" else model.name,
        sessions=sessions,
        frame=frame,
        seconds=args.seconds,
        warmup=args.warmup,
    )
    result = run_event_loop(
        run_load(
            config,
            on_window_start=lambda: marks.__setitem__("start", server.cpu_seconds()[0]),
            on_window_stop=lambda: marks.__setitem__("stop", server.cpu_seconds()[0]),
        ),
        use_uvloop=args.uvloop,
    )
    server.check_alive()
    return Point(
        server=server.label,
        model=model.label,
        sessions=sessions,
        frame=frame,
        steps_per_s=result.steps_per_s,
        messages_per_s=result.messages_per_s,
        p50_us=result.p50_us,
        p99_us=result.p99_us,
        server_cpu_us=1e6 * (marks["stop"] - marks["start"]) / max(result.steps, 1),
        client_cpu_us=1e6 * result.client_cpu_s / max(result.steps, 1),
        errors=sum(result.errors.values()),
    )


Setting = tuple[str, int, int]  # (server label, sessions, frame)


def settings_of(model_index: int, args: argparse.Namespace) -> list[Setting]:
    """What one round measures for a model: the first model gets the plot's points too."""
    frames = [("rnnserve", args.inflight * k, k) for k in args.frames]
    frames.append(("floor", args.inflight * args.target_frame, args.target_frame))
    if args.inflight > 1:  # also one frame of the target size alone: as many sessions as the echo
        frames.append(("rnnserve", args.target_frame, args.target_frame))
    if model_index > 0:
        return [("echo", 64, 0), ("rnnserve", 64, 0), *frames]
    curve = [(label, n, 0) for label in ("echo", "rnnserve") for n in args.curve]
    echo_frames = [("echo", args.inflight * k, k) for k in args.frames]
    return [*curve, *frames, *echo_frames]


def combine(points: list[Point]) -> Point:
    """One point from a setting's rounds: medians."""
    first = points[0]
    return Point(
        server=first.server,
        model=first.model,
        sessions=first.sessions,
        frame=first.frame,
        steps_per_s=statistics.median(p.steps_per_s for p in points),
        messages_per_s=statistics.median(p.messages_per_s for p in points),
        p50_us=statistics.median(p.p50_us for p in points),
        p99_us=statistics.median(p.p99_us for p in points),
        server_cpu_us=statistics.median(p.server_cpu_us for p in points),
        client_cpu_us=statistics.median(p.client_cpu_us for p in points),
        errors=sum(p.errors for p in points),
    )


def run_model(
    index: int,
    model: BenchModel,
    ort_us: dict[int, float],
    servers: dict[str, ServerProcess],
    args: argparse.Namespace,
) -> ModelRun:
    settings = settings_of(index, args)
    done: dict[Setting, list[Point]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for setting in settings if r % 2 == 0 else settings[::-1]:
            label, sessions, frame = setting
            point = measure(servers[label], model, sessions, frame, args)
            done[setting].append(point)
            print(
                f"{model.label:9} round {r + 1} {label:8} {sessions:4} sessions "
                f"{f'frames of {frame}' if frame else 'one step/message':16} "
                f"{point.steps_per_s:9,.0f} steps/s  p50 {point.p50_us:8,.0f} µs  "
                f"server CPU {point.server_cpu_us:6.1f} µs/step",
                flush=True,
            )
    k = args.target_frame
    frames = done[("rnnserve", args.inflight * k, k)]
    alone = done[("rnnserve", k, k)]
    echo = done[("echo", 64, 0)]
    floor = done[("floor", args.inflight * k, k)]
    return ModelRun(
        model=model,
        ort_us=ort_us,
        points=[combine(points) for points in done.values()],
        vs_echo=spread([f.steps_per_s / e.steps_per_s for f, e in zip(frames, echo, strict=True)]),
        cpu=spread([f.server_cpu_us for f in frames]),
        alone_vs_echo=spread(
            [f.steps_per_s / e.steps_per_s for f, e in zip(alone, echo, strict=True)]
        ),
        floor_vs_echo=spread(
            [f.steps_per_s / e.steps_per_s for f, e in zip(floor, echo, strict=True)]
        ),
        vs_floor=spread(
            [f.steps_per_s / e.steps_per_s for f, e in zip(frames, floor, strict=True)]
        ),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--plot", type=Path, default=ROOT / "docs" / "img" / "frames-latency-throughput.png"
    )
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="shipped models")
    parser.add_argument("--frames", default="8,64,256", help="sessions per frame")
    parser.add_argument("--curve", default="1,16,64,256", help="one-step sessions to plot")
    parser.add_argument("--hidden", default="128,512", help="hidden sizes of the models")
    parser.add_argument("--inflight", type=int, default=2, help="frames in flight")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per model, ABBA order")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    parser.add_argument("--asyncio", action="store_true", help="asyncio, not uvloop")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    args = parser.parse_args(argv)
    try:
        for name in ("frames", "curve", "hidden"):
            setattr(args, name, [int(s) for s in getattr(args, name).split(",") if s.strip()])
    except ValueError:
        parser.error("--frames, --curve and --hidden must be comma-separated integers")
    if args.quick:
        args.seconds, args.warmup, args.rounds, args.curve = 1.0, 0.3, 1, [1, 64]
    args.target_frame = 64
    if 64 not in args.curve:
        args.curve.append(64)
    if args.target_frame not in args.frames:
        parser.error("--frames must include 64, the size the targets are stated at")
    if args.inflight < 1 or args.rounds < 1:
        parser.error("--inflight and --rounds must be at least 1")
    args.uvloop = not args.asyncio
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-frames-")))
        models = build_repository(tmp / "repo", args.models, hiddens=tuple(args.hidden))
        ort = {
            m.name: {
                k: ort_cost_us(m.version_dir, k, 50 if args.quick else 300) for k in args.frames
            }
            for m in models
        }
        for m in models:
            costs = ", ".join(f"batch {k}: {us:,.0f} µs" for k, us in ort[m.name].items())
            print(f"ONNX Runtime in-process, {m.label}: {costs}", flush=True)
        logs = tmp / "logs"
        logs.mkdir()
        echo = stack.enter_context(
            ServerProcess("echo", echo_command(models[0].version_dir, args.uvloop), logs)
        )
        real = stack.enter_context(
            ServerProcess("rnnserve", rnnserve_command(tmp / "repo", args.uvloop), logs)
        )
        args.echo_model = models[0].name
        try:
            echo.wait_ready(models[0].name)
            for m in models:
                real.wait_ready(m.name)
            runs = []
            for i, m in enumerate(models):
                # The floor runs the model itself: one per model, started for its rounds only.
                launch = echo_command(m.version_dir, args.uvloop, run_model=True)
                with ServerProcess("floor", launch, logs) as floor:
                    floor.wait_ready(m.name)
                    servers = {"echo": echo, "rnnserve": real, "floor": floor}
                    runs.append(run_model(i, m, ort[m.name], servers, args))
        except (BenchError, RuntimeError) as exc:
            print(f"frames: {exc}", file=sys.stderr)
            return 1
    report = Report(
        started=started, load_before=load_before, args=vars(args), runs=runs, plot=args.plot
    )
    plot(report, args.plot)
    write_section(args.out, "frames", SCRIPT, render(report, args.out))
    if args.json:
        data = [
            {"model": asdict(r.model) | {"version_dir": str(r.model.version_dir)},
             "ort_us": r.ort_us, "points": [asdict(p) for p in r.points],
             "vs_echo": r.vs_echo, "cpu": r.cpu, "alone_vs_echo": r.alone_vs_echo,
             "floor_vs_echo": r.floor_vs_echo, "vs_floor": r.vs_floor}
            for r in runs
        ]  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2))
    print(f"wrote the frames section of {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
