"""The Open Inference Protocol's REST/JSON face (oip_http_port), the way curl uses it."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rnnserve.server.app import ServerStartError

from tests.support.modelgen import reference_run

TOL = 1e-5


async def _call(port: int, path: str, body: Any = None, raw: bytes | None = None) -> Any:
    """(HTTP status, JSON reply) of one request on a connection of its own, as curl makes."""

    def call() -> tuple[int, Any]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(call)


def _infer(x: np.ndarray, sid: Any, **flags: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}],
        "parameters": {"sequence_id": sid, **flags},
    }
    return body


@pytest.fixture
async def port(start_server: Any) -> int:
    running = await start_server(oip_http_port=0)
    assert running.server.oip_http is not None
    return running.server.oip_http.port


async def test_health_and_metadata(port: int) -> None:
    assert await _call(port, "/v2/health/live") == (200, {"live": True})
    assert await _call(port, "/v2/health/ready") == (200, {"ready": True})
    status, server = await _call(port, "/v2")
    assert status == 200 and server["name"] == "rnnserve" and "sequence" in server["extensions"]
    status, meta = await _call(port, "/v2/models/tiny-lstm")
    assert status == 200 and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert [o["name"] for o in meta["outputs"]] == ["y", "h", "c"]
    assert (await _call(port, "/v2/models/tiny-lstm/versions/1/ready"))[0] == 200
    assert await _call(port, "/v2/models/nope/ready") == (404, {"name": "nope", "ready": False})


async def test_a_sequence_over_separate_connections_equals_onnxruntime(
    port: int, model_repo: Path
) -> None:
    x = np.random.default_rng(1).normal(0, 1, (5, 3)).astype(np.float32)
    want, want_state = reference_run(model_repo / "tiny-gru" / "1", x)
    _, a = await _call(port, "/v2/models/tiny-gru/infer", _infer(x[:2], "s1", sequence_start=True))
    last = _infer(x[2:], "s1", sequence_end=True) | {"outputs": [{"name": "y"}, {"name": "h"}]}
    status, b = await _call(port, "/v2/models/tiny-gru/versions/1/infer", last)
    assert status == 200 and b["model_version"] == "1"
    got = np.concatenate([np.reshape(r["outputs"][0]["data"], (-1, 2)) for r in (a, b)])
    assert np.max(np.abs(got - want)) <= TOL
    h = b["outputs"][1]
    assert h["name"] == "h" and h["shape"] == [2, 8]
    assert np.max(np.abs(np.reshape(h["data"], (2, 8)) - want_state["h"])) <= TOL
    status, err = await _call(port, "/v2/models/tiny-gru/infer", _infer(x[:1], "s1"))
    assert status == 400 and "must specify the START flag" in err["error"]


@pytest.mark.parametrize(
    ("path", "body", "raw", "status", "text"),
    [
        ("/v2/models/tiny-gru/infer", {"inputs": []}, None, 400, "correlation ID"),
        ("/v2/models/nope/infer", _infer(np.ones((1, 3), np.float32), 1), None, 404, "nope"),
        ("/v2/models/tiny-gru/infer", None, b"{not json", 400, "not JSON"),
        ("/v2/models/tiny-gru/infer", {"inputs": [{"name": "x"}]}, None, 400, "needs name"),
        ("/v3/anything", None, None, 404, "no such path"),
    ],
    ids=["no-sequence", "unknown-model", "bad-json", "bad-input", "bad-path"],
)
async def test_bad_requests_get_json_errors(
    port: int, path: str, body: Any, raw: bytes | None, status: int, text: str
) -> None:
    got, reply = await _call(port, path, body, raw)
    assert got == status and text in reply["error"]


async def test_metrics_count_the_rest_face_apart(start_server: Any) -> None:
    running = await start_server(oip_http_port=0)
    assert running.server.oip_http is not None
    await _call(running.server.oip_http.port, "/v2/models/tiny-gru/infer", {"inputs": []})
    errors = running.server.registry.get_sample_value(
        "rnnserve_errors_total",
        {"method": "infer", "code": "INVALID_ARGUMENT", "protocol": "oip-http"},
    )
    assert errors == 1


async def test_it_refuses_to_serve_beside_tokens(start_server: Any) -> None:
    with pytest.raises(ServerStartError, match="checks no tokens"):
        await start_server(oip_http_port=0, auth_tokens="alice:alice-token-0123456789abcdef")
