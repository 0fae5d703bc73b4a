"""Scale-out benchmark: what Envoy, a second process and the Redis store cost or give.

Real processes on 127.0.0.1 (tests/support/procs.py starts them: ``rnnserve serve`` replicas
on uvloop, PyPI's Envoy on the shipped deploy/envoy/envoy.yaml, Debian's Redis with AOF), the
load from ``rnnserve bench``'s closed loops (client/rnnserve/client/commands/bench.py) in this
process. Every comparison is a ratio of two runs made back to back in the same round, and each
figure is the median over rounds with its range (the machine is shared and noisy).

1. Hop: the same replica directly and through Envoy (1 and 64 sessions): p50 and steps/s.
2. Processes: 256 sessions through Envoy to one replica and to two: steps/s.
3. Checkpoints: one replica with a store at checkpoint_every 1, 16 and 256 against one without
   a store (64 sessions): steps/s, p50, and Redis commands per second.
4. Takeover: sessions streaming through Envoy, the replica holding some of them SIGKILLed:
   seconds from the kill to each moved session's next output on the survivor.

    .venv/bin/python bench/scaleout.py              # about 6 minutes; writes docs/benchmarks.md
    .venv/bin/python bench/scaleout.py --quick      # a smoke run, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rnnserve.client import AsyncClient, ClientOptions, RetryPolicy  # noqa: E402
from rnnserve.client.commands.bench import LoadConfig, LoadResult, run_load  # noqa: E402

from tests.support.procs import Procs  # noqa: E402

MODEL = "char-gru"
UVLOOP = ["--loop", "uvloop"]
BEGIN, END = "<!-- scaleout:begin -->", "<!-- scaleout:end -->"


async def load(target: str, sessions: int, seconds: float, streams: int = 0) -> LoadResult:
    config = LoadConfig(
        target=target, model=MODEL, sessions=sessions, streams=streams, seconds=seconds, warmup=0.5
    )
    return await run_load(config)


def spread(values: list[float]) -> str:
    """``median (min-max)`` of ratios."""
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


async def hop(procs: Procs, rounds: int, seconds: float) -> dict[str, Any]:
    (replica,) = procs.replicas(["hop"], None, UVLOOP, models=ROOT / "models")
    envoy = procs.envoy([replica])
    envoy.wait_hosts(healthy=["hop"])
    out: dict[str, Any] = {}
    for sessions in (1, 64):
        p50, rate = [], []
        for _ in range(rounds):
            direct = await load(replica.address, sessions, seconds)
            proxied = await load(envoy.address, sessions, seconds)
            p50.append(proxied.p50_us / direct.p50_us)
            rate.append(proxied.steps_per_s / direct.steps_per_s)
        out[f"{sessions}"] = {
            "p50_ratio": p50,
            "steps_ratio": rate,
            "direct_p50_us": direct.p50_us,
            "direct_steps_s": direct.steps_per_s,
        }
    procs.stop_all()
    procs.started.clear()
    return out


async def processes(procs: Procs, rounds: int, seconds: float) -> dict[str, Any]:
    one = procs.replicas(["solo"], None, UVLOOP, models=ROOT / "models")
    two = procs.replicas(["duo-a", "duo-b"], None, UVLOOP, models=ROOT / "models")
    envoy_one, envoy_two = procs.envoy(one), procs.envoy(two)
    envoy_one.wait_hosts(healthy=["solo"])
    envoy_two.wait_hosts(healthy=["duo-a", "duo-b"])
    ratios, rates = [], []
    for _ in range(rounds):
        single = await load(envoy_one.address, 256, seconds)
        double = await load(envoy_two.address, 256, seconds)
        ratios.append(double.steps_per_s / single.steps_per_s)
        rates.append((single.steps_per_s, double.steps_per_s))
    procs.stop_all()
    procs.started.clear()
    return {"steps_ratio": ratios, "steps_s": rates}


async def checkpoints(procs: Procs, rounds: int, seconds: float) -> dict[str, Any]:
    store = procs.redis()
    client = redis.Redis.from_url(store.url)
    models = ROOT / "models"
    plain = procs.replica("nostore", None, UVLOOP, models=models)
    stored = {
        every: procs.replica(
            f"every-{every}", store.url, [*UVLOOP, "--checkpoint-every", str(every)], models
        )
        for every in (1, 16, 256)
    }
    out: dict[str, Any] = {}
    runs: dict[int, list[tuple[float, float, float]]] = {every: [] for every in stored}
    for _ in range(rounds):
        for every, replica in stored.items():
            base = await load(plain.address, 64, seconds)
            before = int(client.info("stats")["total_commands_processed"])
            started = time.perf_counter()
            got = await load(replica.address, 64, seconds)
            elapsed = time.perf_counter() - started
            commands = int(client.info("stats")["total_commands_processed"]) - before
            runs[every].append(
                (got.steps_per_s / base.steps_per_s, got.p50_us / base.p50_us, commands / elapsed)
            )
    for every, values in runs.items():
        out[str(every)] = {
            "steps_ratio": [v[0] for v in values],
            "p50_ratio": [v[1] for v in values],
            "redis_commands_s": statistics.median(v[2] for v in values),
        }
    client.close()
    procs.stop_all()
    procs.started.clear()
    return out


def takeovers(replica: Any) -> float:
    """The replica's rnnserve_takeovers_total."""
    url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rnnserve_takeovers_total":
                return float(sample.value)
    return 0.0


async def _trial(options: ClientOptions, victim: Any, survivor: Any, sessions: int) -> list[float]:
    """One kill: the seconds from it to the next output of each session that moved."""
    killed = float("inf")
    first_after: dict[int, float] = {}
    stop = asyncio.Event()
    async with AsyncClient(options) as client:
        opened = [await client.session(MODEL) for _ in range(sessions)]

        async def drive(k: int) -> None:
            token = np.array([k % 20], np.int64)
            while not stop.is_set():
                await opened[k].step(token)
                now = time.monotonic()
                if now > killed and k not in first_after:
                    first_after[k] = now
                await asyncio.sleep(0.005)

        tasks = [asyncio.ensure_future(drive(k)) for k in range(sessions)]
        await asyncio.sleep(2.0)
        before = takeovers(survivor)
        killed = time.monotonic()
        victim.kill()
        while len(first_after) < sessions and time.monotonic() < killed + 30:
            await asyncio.sleep(0.01)
        moved = int(takeovers(survivor) - before)
        stop.set()
        await asyncio.gather(*tasks)
        for s in opened:
            await s.close()
    # The sessions that moved are the ones that waited longest for their next output.
    return sorted(t - killed for t in first_after.values())[-moved:] if moved else []


async def takeover(procs: Procs, trials: int, sessions: int) -> dict[str, Any]:
    store = procs.redis()
    replicas = procs.replicas(["tk-a", "tk-b"], store.url, UVLOOP, models=ROOT / "models")
    envoy = procs.envoy(replicas)
    envoy.wait_hosts(healthy=["tk-a", "tk-b"])
    gaps: list[float] = []
    options = ClientOptions(target=envoy.address, retry=RetryPolicy(max_backoff_s=0.2))
    for trial in range(trials):
        victim, survivor = replicas[trial % 2], replicas[(trial + 1) % 2]
        gaps += await _trial(options, victim, survivor, sessions)
        await asyncio.to_thread(victim.restart)
        await asyncio.to_thread(envoy.wait_hosts, healthy=["tk-a", "tk-b"])
    procs.stop_all()
    procs.started.clear()
    return {"gaps_s": gaps}


def report(results: dict[str, Any], quick: bool) -> str:
    hop_ = results["hop"]
    lines = [
        BEGIN,
        "## Scale-out (bench/scaleout.py)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"{' (quick)' if quick else ''}; model {MODEL}, replicas on uvloop, Envoy 1.40 on the "
        "shipped config with --concurrency 1, Redis 7 with AOF; client, Envoy, Redis and the "
        "replicas share this 2-core machine. Ratios are within-round pairs: median (range).",
        "",
        "| Through Envoy vs direct, one replica | p50 | steps/s |",
        "|---|---:|---:|",
    ]
    for sessions, r in hop_.items():
        lines.append(
            f"| {sessions} session(s) (direct: p50 {r['direct_p50_us']:.0f} µs, "
            f"{r['direct_steps_s']:.0f} steps/s) | {spread(r['p50_ratio'])} | "
            f"{spread(r['steps_ratio'])} |"
        )
    proc_ = results["processes"]
    single = statistics.median(a for a, _ in proc_["steps_s"])
    double = statistics.median(b for _, b in proc_["steps_s"])
    lines += [
        "",
        f"Two replicas against one, through Envoy, 256 sessions: steps/s "
        f"{spread(proc_['steps_ratio'])} (medians {single:.0f} and {double:.0f} steps/s).",
        "",
        "| Store, 64 sessions, one replica, vs no store | steps/s | p50 | Redis commands/s (a) |",
        "|---|---:|---:|---:|",
    ]
    for every, r in results["checkpoints"].items():
        lines.append(
            f"| checkpoint_every {every} | {spread(r['steps_ratio'])} | "
            f"{spread(r['p50_ratio'])} | {r['redis_commands_s']:.0f} |"
        )
    lines += [
        "",
        "(a) Redis's total_commands_processed, which counts the commands inside each script "
        "(a checkpoint is one script of about five), over the measured window.",
    ]
    gaps = results["takeover"]["gaps_s"]
    if gaps:
        lines += [
            "",
            f"Takeover: SIGKILL of a replica to the next output of each of its sessions on the "
            f"survivor, {len(gaps)} sessions over the trials: median "
            f"{statistics.median(gaps):.2f} s, max {max(gaps):.2f} s (Envoy retries a call "
            "that cannot connect on the other replica at once; the survivor loads the last "
            "checkpoint and the client replays).",
        ]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the scale-out section of ``path`` (or append it); written whole or not at all."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + "\n" + section
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def run(quick: bool) -> dict[str, Any]:
    rounds, seconds = (1, 1.0) if quick else (4, 4.0)
    with tempfile.TemporaryDirectory(prefix="rnnserve-scaleout-") as tmp:
        procs = Procs(Path(tmp))
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("hop", lambda: hop(procs, rounds, seconds)),
            ("processes", lambda: processes(procs, rounds, seconds)),
            ("checkpoints", lambda: checkpoints(procs, max(1, rounds - 1), seconds)),
            ("takeover", lambda: takeover(procs, 1 if quick else 4, 8 if quick else 24)),
        ]
        results: dict[str, Any] = {}
        try:
            for name, job in steps:
                print(f"scaleout: {name}...", flush=True)
                results[name] = await job()
        finally:
            procs.stop_all()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (prints, writes no doc)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, help="also keep the raw figures here")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.quick))
    section = report(results, args.quick)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.quick:
        write_section(args.out, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
