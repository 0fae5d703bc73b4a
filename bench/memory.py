"""Memory per idle session, the event-loop stall while the state pool grows, memory given back.

In one process per setting (a fresh one each, so freed memory of one setting cannot hide the
next one's growth) the real server objects open N sessions: a ``Repository`` loads
models/char-gru/1 (state h [1, 1, 128] float32: 512 bytes) and ``SessionManager.open`` opens
them, each open timed (the event loop does nothing else while one runs, so the longest open is
the longest stall sessions cause). "stepped" then applies one step to every session through the
model's real ``Batcher`` as the Stream path does (requests parsed from bytes, each reply built
inside its StreamResponse), so each session keeps what a stepped one keeps: its last reply for
a retry and its last inputs. "parked": the sessions are opened (and stepped) in blocks of what
one sweep parks (sessions.PARK_PER_SWEEP), and after each block the sweep parks them
(park_after_s as good as 0; nothing else holds them), as a server parks sessions that go idle
over time; "record" keeps every session a record (parking off). Then every session is closed,
the manager's sweep runs once (as the server's next one would) and the RSS is read again.

Per session: (RSS after - RSS before) / N, and that minus the state's own bytes. RSS is read from
/proc/self/statm after a full garbage collection.

    .venv/bin/python bench/memory.py                  # 10k, 100k, 1M; writes docs/benchmarks.md
    .venv/bin/python bench/memory.py --sessions 10000 --no-write
    .venv/bin/python bench/memory.py --breakdown      # tracemalloc: bytes per session, by line
    .venv/bin/python bench/memory.py --hotpath [--baseline FILE]   # SlotPool gather/scatter/read
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "char-gru" / "1"
BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"
DOC = ROOT / "docs" / "benchmarks.md"
#: Sessions opened and stepped per event-loop tick in the stepped setting.
TICK = 256


def rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss() -> int:
    gc.collect()
    return rss()


class _GcPauses:
    """The longest garbage-collector pause (a stall of its own, not the pool's)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._started)


def _server(n: int, park: bool = False) -> tuple[Any, Any]:
    from prometheus_client import CollectorRegistry
    from rnnserve.server.metrics import Metrics
    from rnnserve.server.repository import Repository
    from rnnserve.server.sessions import SessionManager
    from rnnserve.server.settings import Settings

    settings = Settings(models=MODEL.parent.parent, self_check=False, max_sessions=n + 1)
    metrics = Metrics(CollectorRegistry())
    model = Repository(settings, metrics).load_version(MODEL)
    return model, SessionManager(metrics, 1e9, n + 1, park_after_s=1e-9 if park else 0.0)


async def _step_all(model: Any, sessions: list[Any]) -> None:
    """One one-token step for every session through the model's batcher, as a Stream chunk
    is: the request parsed from bytes, its tensor kept as the chunk's digest."""
    from rnnserve.server import codec
    from rnnserve.server.errors import ServingError
    from rnnserve.server.work import Work
    from rnnserve.v1 import rnnserve_pb2 as pb

    answered = 0
    failed: list[ServingError] = []

    class Sink:
        def step_done(self, work: Work, outputs: Any, state: Any) -> None:
            nonlocal answered
            answered += 1

        def step_failed(self, work: Work, err: ServingError) -> None:
            nonlocal answered
            answered += 1
            failed.append(err)

    sink = Sink()
    token = np.array([1], dtype="<i8").tobytes()
    submitted = 0
    for start in range(0, len(sessions), TICK):
        for i, session in enumerate(sessions[start : start + TICK], start):
            raw = pb.StreamRequest(
                request_id=i,
                step=pb.StepRequest(
                    session_id=session.id,
                    seq=0,
                    inputs=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[1], raw_data=token),
                ),
            ).SerializeToString()
            step = pb.StreamRequest.FromString(raw).step  # what gRPC hands the servicer
            inputs = codec.decode_chunk(model, step.inputs)
            model.batcher.submit(Work(session, step.seq, inputs, False, sink, step.inputs))
            submitted += 1
        while answered < submitted:
            await asyncio.sleep(0.0002)
    if failed:
        raise RuntimeError(f"{len(failed)} steps failed, first: {failed[0]}")


def child(n: int, stepped: bool, parked: bool = False) -> dict[str, Any]:
    """One setting in this process: open ``n`` sessions (step them, park them), then close
    them."""
    from rnnserve.server.sessions import CLOSED, PARK_PER_SWEEP

    model, manager = _server(n, parked)
    state_bytes = sum(
        int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in model.manifest.states
    )
    # Warm up what every session shares (engine buffers, the batcher's bound shapes). One
    # event loop throughout: the batcher keeps the loop of its first chunk.
    loop = asyncio.new_event_loop()
    warm = [manager.open(model) for _ in range(TICK)]
    loop.run_until_complete(_step_all(model, warm))
    for s in warm:
        manager.end(s, CLOSED)
    del warm
    pauses = _GcPauses()
    # The benchmark's own bookkeeping exists before the first reading: the sessions (records,
    # or ids of parked ones: a numpy object array, which the garbage collector does not walk,
    # so its pauses are the server's) and the timings (numpy, written through so its pages
    # are resident).
    sessions = np.full(n, None, object)
    opens = np.full(n, -1.0)
    closes = np.full(n, -1.0)
    block = PARK_PER_SWEEP if parked else n
    sweeps = np.zeros(-(-n // block))
    growth: list[float] = []
    clock = time.perf_counter
    pool = model.pool
    before = settled_rss()
    for start in range(0, n, block):
        end = min(n, start + block)
        for i in range(start, end):
            capacity = pool.capacity
            t0 = clock()
            sessions[i] = manager.open(model)
            took = clock() - t0
            opens[i] = took
            if pool.capacity != capacity:
                growth.append(took)
        if stepped:
            loop.run_until_complete(_step_all(model, list(sessions[start:end])))
        if parked:
            for i in range(start, end):
                sessions[i] = sessions[i].id
            time.sleep(0.002)  # idle for longer than park_after_s
            t0 = clock()
            manager.expire_idle()
            sweeps[start // block] = clock() - t0
    gc_open = pauses.longest
    held = settled_rss()
    if parked and manager.parked != n:
        raise RuntimeError(f"{manager.parked} of {n} sessions parked")
    pauses.longest = 0.0
    for i in range(n):
        t0 = clock()
        session = manager.get(sessions[i]) if parked else sessions[i]
        manager.end(session, CLOSED)
        sessions[i] = session = None
        closes[i] = clock() - t0
    gc_close = pauses.longest
    manager.expire_idle()  # the server's next sweep (it trims the heap after many closes)
    closed = settled_rss()
    opens.sort()
    return {
        "sessions": n,
        "run_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "stepped": stepped,
        "parked": parked,
        "state_bytes": state_bytes,
        "rss_before": before,
        "rss_held": held,
        "rss_closed": closed,
        "per_session": (held - before) / n,
        "open_max_ms": float(opens[-1]) * 1e3,
        "open_p999_us": float(opens[int(0.999 * (n - 1))]) * 1e6,
        "open_median_us": float(np.median(opens)) * 1e6,
        "growth_max_ms": max(growth, default=0.0) * 1e3,
        "growths": len(growth),
        "gc_max_ms": gc_open * 1e3,
        "sweep_max_ms": float(sweeps.max()) * 1e3,
        "close_max_ms": float(closes.max()) * 1e3,
        "gc_close_max_ms": gc_close * 1e3,
        "pool_bytes_closed": pool.nbytes,
        "tombstones": len(manager._ended),
    }


def breakdown(n: int) -> list[tuple[str, float]]:
    """Bytes per stepped session by allocating source line (tracemalloc), largest first."""
    model, manager = _server(n)
    loop = asyncio.new_event_loop()
    warm = [manager.open(model) for _ in range(TICK)]
    loop.run_until_complete(_step_all(model, warm))
    tracemalloc.start(1)
    first = tracemalloc.take_snapshot()
    sessions = [manager.open(model) for _ in range(n)]
    loop.run_until_complete(_step_all(model, sessions))
    gc.collect()
    stats = tracemalloc.take_snapshot().compare_to(first, "lineno")
    out = []
    for st in stats[:14]:
        frame = st.traceback[0]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        out.append((where, st.size_diff / n))
    return out


# -- hot path ---------------------------------------------------------------------------------


def _load_pool_class(path: Path | None) -> type:
    if path is None:
        from rnnserve.server.state import SlotPool

        return SlotPool
    spec = importlib.util.spec_from_file_location(f"pool_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SlotPool  # type: ignore[no-any-return]


def _round_trip(pool: Any, slots: npt.NDArray[np.intp], new: dict[str, Any]) -> None:
    pool.scatter(slots, new)
    pool.gather(slots)


def _row(arrays: dict[str, Any], slot: int) -> object:
    return arrays["h"][slot]


def hotpath(classes: dict[str, type], slots_open: int, rounds: int) -> dict[str, dict[str, float]]:
    """µs per call of what the batcher does with the pool, pools filled with ``slots_open``
    sessions, measured round-robin over the pool classes (interleaved, medians of rounds)."""
    from rnnserve.manifest import load_manifest

    specs = load_manifest(MODEL).states
    rng = np.random.default_rng(0)
    pools = {}
    for label, cls in classes.items():
        pool = cls(specs)
        for _ in range(slots_open):
            pool.allocate()
        pools[label] = pool
    results: dict[str, dict[str, list[float]]] = {k: {} for k in classes}

    def timed(label: str, op: str, call: Callable[[], object], number: int) -> None:
        per_call = timeit.timeit(call, number=number) / number * 1e6
        results[label].setdefault(op, []).append(per_call)

    for _ in range(rounds):
        for label, pool in pools.items():
            for batch in (1, 64, 256):
                slots = np.sort(rng.choice(slots_open, batch, replace=False)).astype(np.intp)
                got = pool.gather(slots)
                new = {s.output: got[s.input] + 1 for s in specs}
                timed(
                    label,
                    f"gather+scatter, batch {batch}",
                    partial(_round_trip, pool, slots, new),
                    4000 // batch + 500,
                )
            slot = int(rng.integers(slots_open))
            timed(label, "read(slot)", partial(pool.read, slot), 5000)
            timed(label, "arrays[h][slot]", partial(_row, pool.arrays, slot), 20000)
    return {k: {op: statistics.median(v) for op, v in r.items()} for k, r in results.items()}


# -- report -----------------------------------------------------------------------------------


def section(runs: list[dict[str, Any]]) -> str:
    when = runs[-1]["run_at"]
    lines = [
        BEGIN,
        "## Memory per idle session (bench/memory.py)",
        "",
        f"Run {when}; {platform.python_implementation()} {platform.python_version()}, "
        f"numpy {np.__version__}; model char-gru/1 (state h [1, 1, 128] float32 = 512 bytes); "
        "one fresh process per row, sessions opened with SessionManager.open on the real "
        "ServedModel; stepped: one one-token step each through the model's Batcher as a Stream "
        "chunk is; kept as: record (parking off), or parked (opened in blocks of 1,024, each "
        "block parked by the manager's sweep, as sessions going idle over time are). RSS after "
        "a full garbage collection.",
        "",
        "| sessions | stepped | kept as | RSS per session | over state bytes | "
        "longest open (stall) | longest pool growth | longest GC pause | longest sweep | "
        "longest close | RSS after closing all, over before |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        retained = (r["rss_closed"] - r["rss_before"]) / 2**20
        sweep = f"{r['sweep_max_ms']:.1f} ms" if r["parked"] else "-"
        lines.append(
            f"| {r['sessions']:,} | {'yes' if r['stepped'] else 'no'} | "
            f"{'parked' if r['parked'] else 'record'} | "
            f"{r['per_session']:,.0f} B | {r['per_session'] - r['state_bytes']:,.0f} B | "
            f"{r['open_max_ms']:.1f} ms | {r['growth_max_ms']:.1f} ms ({r['growths']}x) | "
            f"{r['gc_max_ms']:.1f} ms | {sweep} | {r['close_max_ms']:.1f} ms | "
            f"{retained:+,.1f} MiB ({r['tombstones']:,} tombstones) |"
        )
    lines += [
        "",
        "Longest open: the slowest `SessionManager.open` of the run, the event loop blocked for "
        "that long. Longest pool growth: the slowest open that grew the state pool (how many "
        "opens did). Longest GC pause: Python's own garbage collector during the opens, "
        "unrelated to the pool (it walks every session record at each full collection, not "
        "the parked rows). Longest sweep: the slowest `expire_idle` that parked a block. "
        "Longest close: the slowest `SessionManager.end` while all of them close (a parked "
        "one is taken back first). RSS after closing all: read after the manager's next "
        "sweep, which hands the C heap's free pages back after many sessions ended; the "
        "ended sessions' tombstones (the last 100,000 ids, so a late call hears why its "
        "session ended) stay.",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace only what lies between the memory markers (append the section when absent)."""
    doc = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    doc = pattern.sub(lambda _: text, doc) if pattern.search(doc) else doc + "\n" + text
    tmp = path.with_suffix(".memory.tmp")
    tmp.write_text(doc)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--json", type=Path, help="also keep the raw figures here")
    ap.add_argument("--from-json", type=Path, help="write the section from figures kept by --json")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stepped", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--parked", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--hotpath", action="store_true")
    ap.add_argument("--baseline", type=Path, help="a state.py to compare the hot path against")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.stepped, args.parked)))
        return
    if args.breakdown:
        for where, size in breakdown(args.sessions[0]):
            print(f"{size:8.1f} B/session  {where}")
        return
    if args.hotpath:
        classes = {"current": _load_pool_class(None)}
        if args.baseline:
            classes = {"baseline": _load_pool_class(args.baseline), **classes}
        res = hotpath(classes, slots_open=100_000, rounds=15)
        ops = list(next(iter(res.values())))
        print(f"{'µs per call':34}" + "".join(f"{k:>12}" for k in res))
        for op in ops:
            print(f"{op:34}" + "".join(f"{res[k][op]:12.2f}" for k in res))
        return
    if args.from_json:
        write_section(DOC, section(json.loads(args.from_json.read_text())))
        return
    runs = []
    settings = [
        (n, stepped, parked)
        for n in args.sessions
        for parked in (False, True)
        for stepped in (False, True)
    ]
    for n, stepped, parked in settings:
        cmd = [sys.executable, __file__, "--child", str(n)]
        cmd += (["--stepped"] if stepped else []) + (["--parked"] if parked else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(r)
        print(
            f"{n:>9,} stepped={stepped!s:5} parked={parked!s:5} "
            f"{r['per_session']:7.0f} B/session "
            f"(+{r['per_session'] - r['state_bytes']:.0f} over state) "
            f"open max {r['open_max_ms']:.1f} ms, growth max {r['growth_max_ms']:.1f} ms, "
            f"gc max {r['gc_max_ms']:.1f} ms, close max {r['close_max_ms']:.1f} ms; closed: "
            f"{(r['rss_closed'] - r['rss_before']) / 2**20:+.1f} MiB",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    if not args.no_write:
        write_section(DOC, section(runs))


if __name__ == "__main__":
    main()
