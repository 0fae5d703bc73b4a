"""Scale-out with real processes: two ``rnnserve serve`` replicas behind Envoy (the shipped
config) with a Redis session store. Sessions stay on one replica, survive the loss of their
replica (SIGKILL, SIGTERM drain, a pause), are never served stale or overwritten by a replica
that comes back, and serving goes on while Redis is away.

Every session's outputs are compared with the model run straight (tests.support.modelgen), so
a step applied twice, skipped, or run on a stale memory cell shows as a wrong output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rnnserve.client import AsyncClient, ClientOptions, RetryPolicy
from rnnserve.client.aio_session import AsyncSession

from tests.support.modelgen import reference_run
from tests.support.procs import Procs, ReplicaProc

MODEL = "tiny-gru"
TOL = 1e-5
#: Small, so that a lost replica leaves sessions several steps past their last checkpoint.
EVERY = 4
STORE_ARGS = ["--checkpoint-every", str(EVERY)]


def _inputs(procs: Procs, n: int, steps: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` sequences of ``steps`` steps and each one's reference outputs."""
    folder = procs.models / MODEL / "1"
    xs = np.random.default_rng(seed).normal(size=(n, steps, 3)).astype(np.float32)
    return xs, [reference_run(folder, x)[0] for x in xs]


def _options(address: str, **retry: Any) -> ClientOptions:
    # deadline_s: a call stuck on a paused replica fails and is completed by the next call.
    policy = RetryPolicy(max_backoff_s=0.5, give_up_after_s=30.0, **retry)
    return ClientOptions(target=address, deadline_s=10.0, retry=policy)


async def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


def _cluster(procs: Procs, extra: list[str] | None = None) -> tuple[Any, list[ReplicaProc], Any]:
    redis = procs.redis()
    replicas = procs.replicas(["replica-a", "replica-b"], redis.url, [*STORE_ARGS, *(extra or [])])
    envoy = procs.envoy(replicas)
    envoy.wait_hosts(healthy=["replica-a", "replica-b"])
    return redis, replicas, envoy


def _check(outs: list[list[np.ndarray]], expected: list[np.ndarray]) -> None:
    for k, (got, want) in enumerate(zip(outs, expected, strict=True)):
        joined = np.concatenate([np.atleast_2d(o) for o in got])
        assert joined.shape == want.shape, (k, joined.shape)
        assert np.max(np.abs(joined - want)) <= TOL, k


async def test_sessions_stay_on_one_replica(procs: Procs) -> None:
    """100 sessions through Envoy (their own streams, unary calls, a multiplexer): every call
    of a session reaches the replica that opened it (no replica ever took a session over)."""
    _, replicas, envoy = _cluster(procs)
    n, steps = 100, 8
    xs, expected = _inputs(procs, n, steps, seed=1)
    outs: list[list[np.ndarray]] = [[] for _ in range(n)]
    async with AsyncClient(_options(envoy.address)) as client:
        async with client.multiplexer(streams=4) as mux:
            sessions: list[AsyncSession] = []
            for k in range(n):
                opener = mux.session if k % 3 == 2 else client.session
                sessions.append(await opener(MODEL))

            async def drive(k: int) -> None:
                s = sessions[k]
                if k % 3 == 0:  # its own stream, two chunks
                    chunks = [xs[k, :4], xs[k, 4:]]
                    outs[k] += [o async for o in s.stream(chunks)]
                elif k % 3 == 1:  # unary steps, plus session calls that must route alike
                    for t in range(steps):
                        outs[k].append(await s.step(xs[k, t]))
                    assert (await s.info()).next_seq == steps
                else:  # the multiplexer's streams
                    for t in range(0, steps, 2):
                        outs[k].append(await mux.step(s, xs[k, t : t + 2]))

            await asyncio.gather(*(drive(k) for k in range(n)))
        _check(outs, expected)
        metrics = [r.metrics() for r in replicas]
        assert all(m["rnnserve_takeovers_total"] == 0 for m in metrics)
        opened = [m["rnnserve_sessions_opened_total"] for m in metrics]
        assert sum(opened) == n and min(opened) > 0, opened  # spread, each on one replica
        assert sum(m["rnnserve_steps_total"] for m in metrics) == n * steps
        assert sum(m["rnnserve_active_sessions"] for m in metrics) == n
        await asyncio.gather(*(s.close() for s in sessions))
    await _until(lambda: sum(r.metrics()["rnnserve_active_sessions"] for r in replicas) == 0)


async def _run_sessions(
    client: AsyncClient,
    xs: np.ndarray,
    outs: list[list[np.ndarray]],
    progress: list[int],
    pause_s: float = 0.02,
) -> None:
    """Step every session one step at a time, half over their own streams, half unary."""

    async def one(k: int) -> None:
        s = await client.session(MODEL)

        async def feed() -> Any:
            for x in xs[k]:
                await asyncio.sleep(pause_s)
                yield x

        if k % 2 == 0:
            async for out in s.stream(feed()):
                outs[k].append(out)
                progress[k] += 1
        else:
            for x in xs[k]:
                await asyncio.sleep(pause_s)
                outs[k].append(await s.step(x))
                progress[k] += 1
        assert s.next_seq == xs.shape[1]
        await s.close()

    await asyncio.gather(*(one(k) for k in range(xs.shape[0])))


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_a_lost_replica_costs_no_session_and_no_error(procs: Procs, how: str) -> None:
    """SIGKILL (or a SIGTERM drain) of a replica mid-stream: every session finishes through
    the survivor with the outputs of an uninterrupted run, and the app sees no error."""
    _, replicas, envoy = _cluster(procs)
    victim, survivor = replicas
    n, steps = 16, 40
    xs, expected = _inputs(procs, n, steps, seed=2)
    outs: list[list[np.ndarray]] = [[] for _ in range(n)]
    progress = [0] * n
    async with AsyncClient(_options(envoy.address)) as client:
        run = asyncio.ensure_future(_run_sessions(client, xs, outs, progress))
        await _until(lambda: min(progress) >= steps // 3)
        assert victim.metrics()["rnnserve_active_sessions"] > 0  # it holds some of them
        if how == "sigkill":
            victim.kill()
        else:
            code = await asyncio.to_thread(victim.terminate, 15.0)
            assert code == 0
            assert "drained: every session is checkpointed" in victim.log()
        await asyncio.wait_for(run, 120)
    _check(outs, expected)
    metrics = survivor.metrics()
    assert metrics["rnnserve_takeovers_total"] > 0
    assert metrics["rnnserve_active_sessions"] == 0  # every session closed cleanly


async def test_a_replica_that_comes_back_neither_serves_nor_overwrites(procs: Procs) -> None:
    """Replica A is paused; its sessions move to B and go on; A comes back and the ring sends
    their keys to A again: A drops its stale copies and loads B's checkpoints. With a replay
    window of 2 x checkpoint_every, serving A's stale copy would lose the sessions."""
    _, replicas, envoy = _cluster(procs)
    a, b = replicas
    n, part = 12, 12
    xs, expected = _inputs(procs, n, 3 * part, seed=3)
    outs: list[list[np.ndarray]] = [[] for _ in range(n)]
    async with AsyncClient(_options(envoy.address, replay_steps=0)) as client:
        sessions = [await client.session(MODEL) for _ in range(n)]

        async def steps(lo: int, hi: int) -> None:
            for k, s in enumerate(sessions):
                for t in range(lo, hi):
                    outs[k].append(await s.step(xs[k, t]))

        await steps(0, part)
        held_by_a = a.metrics()["rnnserve_active_sessions"]
        assert held_by_a > 0
        a.pause()
        await asyncio.to_thread(envoy.wait_hosts, healthy=["replica-b"], unhealthy=["replica-a"])
        await steps(part, 2 * part)  # A's sessions continue on B
        assert b.metrics()["rnnserve_takeovers_total"] == held_by_a
        a.resume()
        await asyncio.to_thread(envoy.wait_hosts, healthy=["replica-a", "replica-b"])
        # The admin shows A healthy as soon as the main thread knows; Envoy's workers rebuild
        # their rings a moment later (a loaded CI machine once sent every key of phase 3 to B).
        await asyncio.sleep(1.0)
        await steps(2 * part, 3 * part)  # their keys reach A again
        metrics_a = a.metrics()
        assert metrics_a["rnnserve_fenced_total"] == held_by_a  # stale copies dropped
        assert metrics_a["rnnserve_takeovers_total"] == held_by_a  # B's state loaded
        for s in sessions:
            assert s.next_seq == 3 * part
            await s.close()
    _check(outs, expected)


async def test_serving_goes_on_while_redis_is_away(procs: Procs) -> None:
    """Redis killed mid-run: every step is still served, the replicas say the store is down;
    once Redis is back, checkpoints resume, and a replica lost after that costs nothing."""
    redis, replicas, envoy = _cluster(procs)
    n, steps = 8, 60
    xs, expected = _inputs(procs, n, steps, seed=4)
    outs: list[list[np.ndarray]] = [[] for _ in range(n)]
    progress = [0] * n
    async with AsyncClient(_options(envoy.address)) as client:
        run = asyncio.ensure_future(_run_sessions(client, xs, outs, progress, pause_s=0.03))
        await _until(lambda: min(progress) >= 10)
        redis.kill()
        at_kill = list(progress)
        await _until(lambda: all(p >= k + 10 for p, k in zip(progress, at_kill, strict=True)))
        during = [r.metrics() for r in replicas]
        assert all(m["rnnserve_store_up"] == 0 for m in during)  # the gap shows
        assert all(m["rnnserve_store_errors_total"] > 0 for m in during)
        await asyncio.to_thread(redis.restart)
        await _until(lambda: all(r.metrics()["rnnserve_store_up"] == 1 for r in replicas))
        saved = [r.metrics()["rnnserve_checkpoints_total"] for r in replicas]
        await _until(lambda: min(progress) >= 40)
        after = [r.metrics()["rnnserve_checkpoints_total"] for r in replicas]
        assert sum(after) > sum(saved)  # durability resumed (wherever the sessions live)
        replicas[0].kill()  # and is real: the sessions go on from the store
        await asyncio.wait_for(run, 120)
    _check(outs, expected)


def test_an_unreachable_store_at_start_is_not_fatal(procs: Procs, tmp_path: Path) -> None:
    """A replica whose Redis does not answer starts, serves from memory and says so."""
    replica = procs.replica("lonely", "redis://127.0.0.1:1/0", STORE_ARGS)
    assert replica.health() == "SERVING"
    assert "session store unreachable" in replica.log()
    assert replica.metrics()["rnnserve_store_up"] == 0


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_a_gateway_loses_nothing_with_a_replica(procs: Procs, how: str) -> None:
    """A gateway: frames of 32 sessions (Multiplexer.step_many over 4 streams) through Envoy;
    the replica holding most of them is lost mid-run (SIGKILL, or a SIGTERM drain) while frames
    are in flight. Every session's outputs equal an uninterrupted run; the app sees no error."""
    _, replicas, envoy = _cluster(procs)
    n, steps = 32, 30
    xs, expected = _inputs(procs, n, steps, seed=6)
    outs: list[list[np.ndarray]] = [[] for _ in range(n)]
    client = AsyncClient(_options(envoy.address))
    async with client, client.multiplexer(streams=4) as mux:
        sessions = [await mux.session(MODEL) for _ in range(n)]
        loss = None
        for t in range(steps):
            if t == steps // 3:
                held = [r.metrics()["rnnserve_active_sessions"] for r in replicas]
                victim = replicas[0] if held[0] >= held[1] else replicas[1]
                assert max(held) > 0
                lose = victim.kill if how == "sigkill" else victim.terminate
                loss = asyncio.ensure_future(asyncio.to_thread(lose))
                await asyncio.sleep(0)
            ys = await mux.step_many(sessions, xs[:, t])
            for k in range(n):
                outs[k].append(ys[k])
        assert loss is not None
        await loss
        for s in sessions:
            assert s.next_seq == steps
    _check(outs, expected)
    survivor = replicas[1] if victim is replicas[0] else replicas[0]
    assert survivor.metrics()["rnnserve_takeovers_total"] > 0
