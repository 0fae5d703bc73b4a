"""Model-based test of Open Inference Protocol sequences: many sequences on one
ModelStreamInfer stream, their requests written without waiting for replies, with bad requests
(NaN inputs, wrong shapes) and restarts (START on an open id) mixed in, and rnnserve.v1 steps
of other sessions in the same engine runs. Each sequence's outputs must equal a reference run
of exactly its good requests, in order, and each bad request must be answered in-band."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import from_tensor, to_tensor

from tests.support.modelgen import Reference
from tests.support.raw import oip_outputs, oip_request

TOL = 1e-5
MODEL = "tiny-gru"


@pytest.mark.parametrize("seed", [1, 2])
async def test_pipelined_sequences_with_bad_requests_stay_exact(
    server: Any, model_repo: Path, seed: int
) -> None:
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    ref = Reference(model_repo)
    channel = grpc.aio.insecure_channel(server.address)
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    v1 = pb_grpc.InferenceServiceStub(channel)
    n = 12
    states = {k: ref.zeros(MODEL) for k in range(1, n + 1)}
    started: set[int] = set()
    requests = []
    #: What each request's reply must be, in the order the requests are written.
    wants: list[tuple[int, Any]] = []
    for _ in range(300):
        k = rng.randint(1, n)
        x = np_rng.normal(0.0, 1.0, (rng.randint(1, 3), 3)).astype(np.float32)
        roll = rng.random()
        if k not in started or roll < 0.05:  # START (again): the sequence begins on zeros
            states[k] = ref.zeros(MODEL)
            started.add(k)
            req = oip_request(MODEL, x, k, start=True)
        elif roll < 0.12:  # a bad request: answered in-band, not applied
            bad = x.copy()
            bad[0, 0] = np.nan
            requests.append(oip_request(MODEL, bad, k))
            wants.append((k, None))
            continue
        else:
            req = oip_request(MODEL, x, k)
        y, states[k] = ref.run(MODEL, x, states[k])
        requests.append(req)
        wants.append((k, y))

    async def send() -> Any:
        for req in requests:
            yield req

    async def bystander() -> None:  # rnnserve.v1 steps sharing the engine runs meanwhile
        sid = (await v1.OpenSession(pb.OpenSessionRequest(model=MODEL))).session.session_id
        state = ref.zeros(MODEL)
        for seq in range(40):
            x = np_rng.normal(0.0, 1.0, (1, 3)).astype(np.float32)
            reply = await v1.Step(pb.StepRequest(session_id=sid, seq=seq, inputs=to_tensor(x)))
            y, state = ref.run(MODEL, x, state)
            assert np.max(np.abs(np.asarray(from_tensor(reply.outputs)) - y)) <= TOL

    async def stream() -> list[Any]:
        return [reply async for reply in stub.ModelStreamInfer(send())]

    replies, _ = await asyncio.gather(stream(), bystander())
    assert len(replies) == len(requests)
    # Replies keep each sequence's order: match them to the requests per sequence.
    per_seq: dict[int, list[Any]] = {}
    for reply in replies:
        sid = int(reply.infer_response.id) if not reply.error_message else None
        per_seq.setdefault(sid if sid is not None else -1, []).append(reply)
    expected: dict[int, list[Any]] = {}
    for k, y in wants:
        expected.setdefault(k if y is not None else -1, []).append(y)
    assert len(per_seq.get(-1, [])) == len(expected.get(-1, []))
    for reply in per_seq.get(-1, []):
        assert "NaN" in reply.error_message or "nan" in reply.error_message, reply.error_message
    for k, ys in expected.items():
        if k == -1:
            continue
        got = per_seq[k]
        assert len(got) == len(ys), k
        for reply, y in zip(got, ys, strict=True):
            assert np.max(np.abs(oip_outputs(reply.infer_response) - y)) <= TOL, k
    await channel.close()
