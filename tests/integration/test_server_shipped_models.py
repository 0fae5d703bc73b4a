"""The shipped model repository (models/) serves with the self-check on, every version of it."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from tests.support.raw import open_session, outputs, step

SHIPPED = Path(__file__).resolve().parents[2] / "models"


def _versions() -> list[Path]:
    return sorted(
        p.parent for p in SHIPPED.glob("*/*/manifest.json") if not p.parent.name.startswith(".")
    )


async def test_every_shipped_model_serves_and_steps(start_server):
    versions = _versions()
    if not versions:
        pytest.skip(f"no shipped models under {SHIPPED} yet")
    running = await start_server(models=SHIPPED, self_check=True, reload_interval_s=0)
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        served = (await stub.ListModels(pb.ListModelsRequest())).models
        assert {(m.name, m.version) for m in served} == {(v.parent.name, v.name) for v in versions}
        for info in served:
            sid = await open_session(stub, info.name, info.version)
            if info.input_kind == pb.INPUT_KIND_TOKENS:
                x = np.arange(5, dtype=np.int64) % len(info.vocabulary)
            else:
                x = np.zeros((5, info.input.shape[1]), np.float32)
            y = outputs(await step(stub, sid, 0, x))
            assert y.shape == (5, info.output.shape[1]) and np.isfinite(y).all()
