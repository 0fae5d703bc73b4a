"""Step round trip, throughput and server CPU per step: rnnserve beside a bare echo, one run.

Starts server processes on free 127.0.0.1 ports, the echo (bench/echo_server.py: the same
gRPC stack, no sessions, no model) and ``rnnserve serve``, once on asyncio's default loop and
once on uvloop (client and servers alike), and for one session a third: the echo spinning for
the model run's time per message, the floor of any server that runs the model in-process. At
each concurrency (1, 16, 64, 256 sessions, one Stream call per session, closed loop; then 256
sessions on one shared Stream) it measures the servers back to back, four times in ABBA
order, with the load generator of ``rnnserve bench``: round trip p50/p99, steps/s, and the
server process's CPU time per step (utime + stime of /proc/<pid>/stat over the measured window,
divided by the steps applied in it). Before the servers start it also times the model run
alone (rnnserve's Engine at batch 1, in this process), the part of rnnserve's round trip that
the echo floor does not pay. Then it writes the results into docs/benchmarks.md between the
``step_latency`` markers, leaving the rest of the file as it is.

Usage: ``python bench/step_latency.py [--quick] [--out docs/benchmarks.md] [--models DIR]``.
A full run takes about 10 minutes; ``--quick`` about 30 seconds (asyncio only, one short run
each).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from report import (  # bench/, the script's folder
    SPIN_LABEL,
    EngineTiming,
    Floor,
    Measurement,
    Ratios,
    RunInfo,
    render,
    write_section,
)
from rnnserve.client.commands.bench import BenchError, LoadConfig, run_event_loop, run_load
from rnnserve.manifest import ManifestError, load_manifest
from rnnserve.server.engine import CPU, Engine
from servers import ServerProcess, echo_command, rnnserve_command

ROOT = Path(__file__).resolve().parents[1]
#: Shipped models to prefer, in order (exact names first, then any name containing the key):
#: the char model on a native GRU node, any char model, then the CO2 forecaster.
PREFERRED = ("char-gru", "char", "co2")


def pick_model(models: Path, name: str | None) -> tuple[Path, str, str] | None:
    """(repository, model name, description) of a shipped model, or None when there is none."""
    if not models.is_dir():
        return None
    candidates = sorted(p for p in models.iterdir() if p.is_dir())
    if name is not None:
        candidates = [p for p in candidates if p.name == name]
    else:
        exact = [p for key in PREFERRED for p in candidates if p.name == key]
        candidates = exact + [p for key in PREFERRED for p in candidates if key in p.name]
    for folder in candidates:
        versions = sorted(
            (v for v in folder.iterdir() if (v / "manifest.json").is_file()),
            key=lambda v: (len(v.name), v.name),
        )
        if versions:
            try:
                m = load_manifest(versions[-1])
            except ManifestError:
                continue
            desc = (
                f"shipped `{m.name}` version {m.version}: {m.cell}, {m.layers} layer(s) of "
                f"{m.hidden_size}, {m.input_kind} in ({m.input_size}), {m.output_size} out"
            )
            return models, folder.name, desc
    return None


@contextlib.contextmanager
def generated_model() -> Iterator[tuple[Path, str, str]]:
    """A modelgen test model in a temporary repository, when no shipped model is there."""
    sys.path.insert(0, str(ROOT))
    from tests.support.modelgen import write_model

    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-") as tmp:
        write_model(Path(tmp), "tiny-char", cell="gru", input_kind="tokens", hidden=16, seed=3)
        yield (
            Path(tmp),
            "tiny-char",
            "tests/support/modelgen.py `tiny-char` (no shipped char or co2 model was found): "
            "GRU, 2 layers of 16, 20 token ids in, 20 logits out",
        )


def measure(
    server: ServerProcess,
    model: str,
    sessions: int,
    streams: int,
    args: argparse.Namespace,
    uvloop: bool,
) -> Measurement:
    """One closed-loop run against one server, with its CPU time sampled over the window."""
    marks: dict[str, tuple[float, float]] = {}
    config = LoadConfig(
        target=server.target,
        model=model,
        sessions=sessions,
        streams=streams,
        chunk=args.chunk,
        seconds=args.seconds,
        warmup=args.warmup,
    )
    result = run_event_loop(
        run_load(
            config,
            on_window_start=lambda: marks.__setitem__("start", server.cpu_seconds()),
            on_window_stop=lambda: marks.__setitem__("stop", server.cpu_seconds()),
        ),
        use_uvloop=uvloop,
    )
    server.check_alive()
    steps = max(result.steps, 1)
    (total0, loop0), (total1, loop1) = marks["start"], marks["stop"]
    return Measurement(
        server=server.label,
        loop="uvloop" if uvloop else "asyncio",
        sessions=sessions,
        streams=streams,
        p50_us=result.p50_us,
        p99_us=result.p99_us,
        steps=result.steps,
        steps_per_s=result.steps_per_s,
        server_cpu_us_per_step=1e6 * (total1 - total0) / steps,
        server_loop_cpu_us_per_step=1e6 * (loop1 - loop0) / steps,
        client_cpu_us_per_step=1e6 * result.client_cpu_s / steps,
        errors=sum(result.errors.values()),
    )


def time_engine(version_dir: Path, runs: int = 1000) -> EngineTiming:
    """Median wall time of one engine run (batch 1, one step, zeros), with the CPU idle for
    0.5 ms before each run (as between one session's steps) and back to back."""
    engine = Engine(version_dir, load_manifest(version_dir), [CPU])
    x, states = engine.zero_batch()
    lengths = np.ones(1, np.int32)

    def timed(pause: float) -> float:
        took = []
        for _ in range(runs):
            if pause:
                time.sleep(pause)
            start = time.perf_counter_ns()
            engine.run(x, states, lengths)
            took.append(time.perf_counter_ns() - start)
        return float(statistics.median(took)) / 1000

    timed(0.0)  # warm up
    return EngineTiming(idle_us=timed(0.0005), busy_us=timed(0.0))


def combine(runs: list[Measurement]) -> Measurement:
    """One figure per server from repeated runs: rates and CPU over all steps, percentiles
    the median of the runs' (one run disturbed by a neighbour moves it least)."""
    if len(runs) == 1:
        return runs[0]
    steps = sum(m.steps for m in runs)
    window = sum(m.steps / m.steps_per_s for m in runs if m.steps_per_s > 0)

    def per_step(value: Callable[[Measurement], float]) -> float:
        return sum(value(m) * m.steps for m in runs) / max(steps, 1)

    return dataclasses.replace(
        runs[0],
        p50_us=statistics.median(m.p50_us for m in runs),
        p99_us=statistics.median(m.p99_us for m in runs),
        steps=steps,
        steps_per_s=steps / window if window > 0 else 0.0,
        server_cpu_us_per_step=per_step(lambda m: m.server_cpu_us_per_step),
        server_loop_cpu_us_per_step=per_step(lambda m: m.server_loop_cpu_us_per_step),
        client_cpu_us_per_step=per_step(lambda m: m.client_cpu_us_per_step),
        errors=sum(m.errors for m in runs),
    )


#: Label of the echo that spins for the model run's time per message (one session only).
SPIN = SPIN_LABEL


def run_all(
    args: argparse.Namespace, repo: Path, model: str, log_dir: Path, engine: EngineTiming
) -> tuple[list[Measurement], list[Ratios], list[Floor]]:
    """Every (loop, concurrency, server) measurement, echo and rnnserve back to back, the
    ratios of each setting's paired runs, and at one session the floor an in-process model run
    sets: a third server, the echo spinning for the model run's time per message, measured
    between the two."""
    version_dir = max(
        (v for v in (repo / model).iterdir() if (v / "manifest.json").is_file()),
        key=lambda v: (len(v.name), v.name),
    )
    results: list[Measurement] = []
    ratios: list[Ratios] = []
    floors: list[Floor] = []
    for uvloop in args.loops:
        loop_name = "uvloop" if uvloop else "asyncio"
        with (
            ServerProcess("echo", echo_command(version_dir, uvloop), log_dir) as echo,
            ServerProcess("rnnserve", rnnserve_command(repo, uvloop), log_dir) as real,
            ServerProcess(SPIN, echo_command(version_dir, uvloop, engine.idle_us), log_dir) as spin,
        ):
            for server in (echo, real, spin):
                server.wait_ready(model)
            # rnnserve chooses its loop itself and says so; make sure it is the one asked for.
            if real.log_contains("with uvloop") != uvloop:
                raise RuntimeError(f"rnnserve did not start on {loop_name}:\n{real.log_tail()}")
            runs = [(n, 0) for n in args.sessions] + [(n, 1) for n in args.shared]
            for sessions, streams in runs:
                # ABBA order over the repeats: drift of a shared machine hits both alike. At one
                # session the spinning echo runs between them.
                middle = [spin] if (sessions, streams) == (1, 0) else []
                order = [
                    [echo, *middle, real] if r % 2 == 0 else [real, *middle, echo]
                    for r in range(args.repeat)
                ]
                done: dict[str, list[Measurement]] = {"echo": [], "rnnserve": [], SPIN: []}
                for servers in order:
                    for server in servers:
                        m = measure(server, model, sessions, streams, args, uvloop)
                        done[server.label].append(m)
                ratios.append(Ratios.of(done["rnnserve"], done["echo"]))
                if middle:
                    floors.append(
                        Floor(
                            loop=loop_name,
                            busy_us=engine.idle_us,
                            spin_vs_echo=Ratios.of(done[SPIN], done["echo"]),
                            real_vs_spin=Ratios.of(done["rnnserve"], done[SPIN]),
                        )
                    )
                for label in ("echo", SPIN, "rnnserve"):
                    if not done[label]:
                        continue
                    m = combine(done[label])
                    layout = "1 stream " if streams else "streams  "
                    print(
                        f"{loop_name:8} {sessions:4} sessions {layout} {label:9} "
                        f"p50 {m.p50_us:8.0f} µs  p99 {m.p99_us:8.0f} µs  "
                        f"{m.steps_per_s:8.0f} steps/s  server CPU "
                        f"{m.server_cpu_us_per_step:6.1f} µs/step "
                        f"(loop thread {m.server_loop_cpu_us_per_step:.1f})",
                        flush=True,
                    )
                    results.append(m)
    return results, ratios, floors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", help="model name in --models (default: a char or co2 model)")
    parser.add_argument("--sessions", default="1,16,64,256", help="comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run")
    parser.add_argument(
        "--repeat", type=int, default=4, help="runs per server and setting, in ABBA order"
    )
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per run")
    parser.add_argument("--chunk", type=int, default=1, help="steps per message")
    parser.add_argument(
        "--shared",
        default="256",
        help="session counts also measured multiplexed on one shared Stream ('' for none)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="measure asyncio only")
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    args = parser.parse_args(argv)
    for name in ("sessions", "shared"):
        text = getattr(args, name)
        try:
            setattr(args, name, [int(s) for s in text.split(",") if s.strip()])
        except ValueError:
            parser.error(f"--{name} {text!r} must be comma-separated integers")
    if args.quick:
        args.seconds, args.warmup, args.no_uvloop, args.shared = 1.0, 0.5, True, []
        args.repeat = 1
    args.loops = [False] if args.no_uvloop else [False, True]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        picked = pick_model(args.models, args.model)
        if picked is None:
            if args.model is not None:
                print(f"step_latency: no model {args.model!r} in {args.models}", file=sys.stderr)
                return 2
            picked = stack.enter_context(generated_model())
        else:
            # Serve a copy of the one model measured: a model retrained or added in the shared
            # repository during the run would be hot-reloaded and bill its load to the server.
            copy = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-repo-")))
            shutil.copytree(picked[0] / picked[1], copy / picked[1])
            picked = (copy, picked[1], picked[2])
        repo, model, description = picked
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-logs-")))
        version_dir = max(
            (v for v in (repo / model).iterdir() if (v / "manifest.json").is_file()),
            key=lambda v: (len(v.name), v.name),
        )
        engine = time_engine(version_dir, 200 if args.quick else 1000)
        print(
            f"model run alone: {engine.idle_us:.1f} µs after an idle spell, "
            f"{engine.busy_us:.1f} µs back to back",
            flush=True,
        )
        try:
            results, ratios, floors = run_all(args, repo, model, log_dir, engine)
        except (BenchError, RuntimeError) as exc:
            print(f"step_latency: {exc}", file=sys.stderr)
            return 1
    info = RunInfo.collect(
        model=description,
        settings=(
            f"{args.repeat} run(s) per server and setting in ABBA order, each a "
            f"{args.seconds:g} s window after {args.warmup:g} s warmup; chunk {args.chunk}"
            + (", quick run" if args.quick else "")
        ),
        load_before=before,
    )
    write_section(args.out, render(results, ratios, info, engine, floors))
    if args.json:
        data: dict[str, Any] = {
            "run": info.__dict__,
            "engine": engine.__dict__,
            "results": [m.__dict__ for m in results],
            "ratios": [r.__dict__ for r in ratios],
            "floors": [dataclasses.asdict(f) for f in floors],
        }
        args.json.write_text(json.dumps(data, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
