"""``rnnserve bench``: a closed-loop load generator for any rnnserve server.

N sessions, each opened with its own ``OpenSession``; each sends one chunk, waits for its reply,
then sends the next (closed loop), so the offered load follows the server's speed. By default
every session gets its own bidirectional ``Stream`` call, all calls on one channel (one HTTP/2
connection): what an app does that gives each of its users a stream, and the layout the
reference figures in ARCHITECTURE.md were measured with. ``--streams K`` multiplexes the
sessions over K ``Stream`` calls instead (a gateway fanning many users into few streams).
``--frame K`` sends the chunks of K sessions in one message (a ``StepFrame``), one frame in
flight per group of K sessions: ``--sessions 128 --frame 64`` keeps two frames in flight.

A round trip (one message: a session's chunk or a frame) is timed from just before the request
is handed to gRPC to just after its reply comes back (``time.perf_counter_ns``); the
percentiles cover round trips sent and answered inside the window, the rates every reply that
arrived inside it. Sessions run ``--warmup`` seconds unmeasured, then the measured window
opens: ``--seconds`` long, or until every session has applied ``--steps`` steps. Callers that
sample the server's CPU (bench/step_latency.py) get callbacks at the window's edges. Depends
only on grpcio, protobuf, numpy and rnnserve.v1/rnnserve.wire.

The work is split by job: ``_bench_loops`` (the closed loops, the Stream channels and the
window), ``_bench_load`` (configuration, run and result); this module is the command.
"""

from __future__ import annotations

import argparse
import json
import sys

from ._bench_load import LoadConfig, LoadResult, run_event_loop, run_load
from ._bench_loops import BenchError

__all__ = [
    "BenchError",
    "LoadConfig",
    "LoadResult",
    "configure",
    "format_result",
    "run",
    "run_event_loop",
    "run_load",
]


def format_result(result: LoadResult) -> str:
    """A few human-readable lines about one run."""
    c = result.config
    layout = "one stream each" if c.streams == 0 else f"{min(c.streams, c.loops)} stream(s)"
    if c.frame:
        layout = f"frames of {c.frame} ({c.loops} in flight), {layout}"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(result.errors.items())) or "0"
    per_step = 1e6 * result.client_cpu_s / result.steps if result.steps else 0.0
    return "\n".join(
        [
            f"rnnserve bench  {result.model_version} at {c.target}  "
            f"{c.sessions} session(s), {layout}, chunk {c.chunk}",
            f"  window {result.window_s:.2f} s  messages {result.messages:,}  "
            f"{'session-' if c.frame else ''}steps {result.steps:,}  errors {errors}",
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
        help="Stream calls the sessions (or frames) share (default 0: one stream each)",
    )
    parser.add_argument("--chunk", type=int, default=1, help="steps per session per message")
    parser.add_argument(
        "--frame",
        type=int,
        default=0,
        help="sessions per message, sent as one frame (default 0: one session per message); "
        "--sessions must be a multiple: sessions / frame frames are in flight",
    )
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
        frame=args.frame,
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
        print(
            f"rnnserve bench: {sum(result.errors.values())} message(s) or frame entries failed",
            file=sys.stderr,
        )
        return 1
    return 0
