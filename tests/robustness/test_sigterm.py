"""SIGTERM under load loses no acknowledged step: 32 sessions step as fast as they can on an
``rnnserve serve`` replica with a Redis store; the replica gets SIGTERM mid-load and drains;
a second replica on the same store then holds every session at or past the last step its
client had an answer for (one chunk past it at most: a chunk applied whose reply was cut
off), and each session continues from there with the outputs of an uninterrupted run."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from tests.support import raw
from tests.support.modelgen import reference_run

SESSIONS = 32
CHUNK = 2


async def test_sigterm_under_load_loses_no_acknowledged_step(procs: Any) -> None:
    redis = procs.redis()
    first = procs.replica("a", store_url=redis.url)
    rng = np.random.default_rng(11)
    xs = rng.normal(size=(4000, CHUNK, 3)).astype(np.float32)
    acked: dict[str, int] = {}  # session -> next_seq of its last answered chunk
    outs: dict[str, list[np.ndarray]] = {}
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sids = [await raw.open_session(stub, "tiny-gru") for _ in range(SESSIONS)]

        async def drive(sid: str) -> None:
            acked[sid], outs[sid] = 0, []
            for k in range(len(xs)):
                try:
                    reply = await raw.step(stub, sid, CHUNK * k, xs[k])
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                    return
                acked[sid] = reply.next_seq
                outs[sid].append(raw.outputs(reply))

        load = [asyncio.ensure_future(drive(sid)) for sid in sids]
        await asyncio.sleep(1.5)
        code = await asyncio.to_thread(first.terminate, 30.0)
        await asyncio.wait_for(asyncio.gather(*load), 30)
    assert code == 0, first.log()[-3000:]
    assert min(acked.values()) > 0, "the load never got going"
    second = await asyncio.to_thread(procs.replica, "b", redis.url)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for sid in sids:
            info = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
            assert acked[sid] <= info.next_seq <= acked[sid] + CHUNK, (sid, acked[sid], info)
            k = info.next_seq // CHUNK
            reply = await raw.step(stub, sid, info.next_seq, xs[k])
            got = np.concatenate([*outs[sid][:k], raw.outputs(reply)])
            whole = xs[: k + 1].reshape(-1, 3)
            expected, _ = reference_run(Path(procs.models) / "tiny-gru" / "1", whole)
            np.testing.assert_allclose(got[-CHUNK:], expected[-CHUNK:], atol=1e-5)
