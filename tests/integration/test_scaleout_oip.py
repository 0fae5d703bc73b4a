"""Open Inference Protocol sequences (a Triton client's) behind Envoy with two replicas on a
Redis store, as real processes: a SIGTERM drain of a replica that holds sequences hands them
over, and every sequence finishes with the outputs of an uninterrupted run."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from inference import grpc_service_pb2_grpc as oip_grpc

from tests.support.modelgen import reference_run
from tests.support.procs import Procs
from tests.support.raw import oip_outputs as _y
from tests.support.raw import oip_request

MODEL = "tiny-gru"
TOL = 1e-5
ALICE = "alice-token-0123456789abcdef"


async def test_oip_sequences_go_on_through_a_drain(procs: Procs) -> None:
    redis = procs.redis()
    replicas = procs.replicas(
        ["replica-a", "replica-b"], redis.url, ["--auth-tokens", f"alice:{ALICE}"]
    )
    envoy = procs.envoy(replicas)
    envoy.wait_hosts(healthy=["replica-a", "replica-b"])
    n, steps = 12, 30
    xs = np.random.default_rng(8).normal(size=(n, steps, 3)).astype(np.float32)
    expected = [reference_run(procs.models / MODEL / "1", x)[0] for x in xs]
    outs: list[list[np.ndarray]] = [[] for _ in range(n)]
    progress = [0] * n
    resent = [0]
    channel = grpc.aio.insecure_channel(envoy.address)
    stub = oip_grpc.GRPCInferenceServiceStub(channel)

    async def sequence(k: int) -> None:
        # One route key per sequence, as docs/oip.md asks behind Envoy.
        md = (("authorization", f"Bearer {ALICE}"), ("x-rnnserve-route", f"seq-{k}"))
        for t in range(steps):
            req = oip_request(MODEL, xs[k, t : t + 1], k + 1, start=t == 0, end=t == steps - 1)
            while True:  # what an app does with UNAVAILABLE: send the request again
                try:
                    reply = await stub.ModelInfer(req, metadata=md, timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or resent[0] > 200:
                        raise
                    resent[0] += 1
                    await asyncio.sleep(0.05)
            outs[k].append(_y(reply))
            progress[k] += 1
            await asyncio.sleep(0.02)

    run = asyncio.ensure_future(asyncio.gather(*(sequence(k) for k in range(n))))
    while min(progress) < steps // 3:
        await asyncio.sleep(0.05)
    held = [r.metrics()["rnnserve_active_sessions"] for r in replicas]
    victim, survivor = replicas if held[0] >= held[1] else replicas[::-1]
    assert max(held) > 0
    code = await asyncio.to_thread(victim.terminate, 15.0)
    assert code == 0
    assert "drained: every session is checkpointed" in victim.log()
    await asyncio.wait_for(run, 120)
    await channel.close()
    for k in range(n):
        assert np.max(np.abs(np.concatenate(outs[k]) - expected[k])) <= TOL, k
    metrics = survivor.metrics()
    assert metrics["rnnserve_takeovers_total"] == max(held)  # each of the victim's sequences
    assert metrics["rnnserve_active_sessions"] == 0  # every sequence ended (END)
