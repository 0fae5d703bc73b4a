"""The Open Inference Protocol's REST/JSON face (KServe v2 HTTP), for curl users.

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/{name}[/versions/{version}][/ready]
    POST /v2/models/{name}[/versions/{version}]/infer

A request becomes the gRPC face's ModelInferRequest and goes through the same servicer
(``OipServicer.accept``): the same checks, sequences, batcher and engine. It runs on its own
port (``oip_http_port``) in a thread of HTTP handlers, each handing its work to the event loop
and waiting for the answer. Sequences are scoped by the client's address without the port (curl
opens a connection per call); the face checks no tokens and speaks no TLS, so the server refuses
to start it when the gRPC port has either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import socketserver
import threading
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from inference import grpc_service_pb2 as oip
from rnnserve.server.errors import ServingError, as_serving_error, invalid, not_found
from rnnserve.server.oip_sequences import Caller
from rnnserve.server.session_ids import ROUTE_KEY
from rnnserve.wire import ROUTE_HEADER

if TYPE_CHECKING:
    from rnnserve.server.oip import OipServicer

PROTOCOL = "oip-http"
#: Seconds a handler waits for the event loop's answer before it gives up (504).
ANSWER_TIMEOUT_S = 60.0
MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?")
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED: HTTPStatus.NOT_IMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
}
_CONTENTS = {"FP32": "fp32_contents", "INT64": "int64_contents", "FP64": "fp64_contents"}


def _parameter(target: oip.InferParameter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if value >= 2**63:
            target.uint64_param = value
        else:
            target.int64_param = value
    elif isinstance(value, str):
        target.string_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        raise invalid(f"parameter {key!r} must be a bool, integer, number or string")


def infer_request(name: str, version: str, body: Any) -> oip.ModelInferRequest:
    """The ModelInferRequest of a JSON infer body; INVALID_ARGUMENT saying what is wrong."""
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object with an 'inputs' list")
    request = oip.ModelInferRequest(model_name=name, model_version=version)
    request.id = str(body.get("id", ""))
    for key, value in (body.get("parameters") or {}).items():
        _parameter(request.parameters[key], key, value)
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("'inputs' must be a list of {name, shape, datatype, data}")
    for item in inputs:
        try:
            tensor = request.inputs.add(
                name=item["name"], datatype=item["datatype"], shape=item["shape"]
            )
            data = np.asarray(item["data"]).ravel().tolist()
        except (KeyError, TypeError, ValueError) as exc:
            raise invalid(f"each input needs name, shape, datatype and data: {exc}") from None
        field = _CONTENTS.get(tensor.datatype)
        if field is None:
            raise invalid(
                f"input '{tensor.name}' datatype {tensor.datatype!r}: this face takes "
                + ", ".join(_CONTENTS)
            )
        try:
            getattr(tensor.contents, field).extend(data)
        except (TypeError, ValueError) as exc:
            raise invalid(
                f"input '{tensor.name}' data does not fit {tensor.datatype}: {exc}"
            ) from None
    for item in body.get("outputs") or []:
        if not isinstance(item, dict) or "name" not in item:
            raise invalid("each requested output needs a name")
        request.outputs.add(name=str(item["name"]))
    return request


def infer_json(reply: oip.ModelInferResponse) -> dict[str, Any]:
    """The JSON of a ModelInferResponse, each output's raw bytes as a flat list of numbers."""
    outputs = []
    for out, raw in zip(reply.outputs, reply.raw_output_contents, strict=True):
        data = np.frombuffer(raw, "<f4" if out.datatype == "FP32" else "<f8").tolist()
        outputs.append(
            {"name": out.name, "datatype": out.datatype, "shape": list(out.shape), "data": data}
        )
    body: dict[str, Any] = {
        "model_name": reply.model_name,
        "model_version": reply.model_version,
        "outputs": outputs,
    }
    if reply.id:
        body["id"] = reply.id
    return body


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    face: OipHttp


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # the metrics count calls
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, verb: str) -> None:
        face = self.server.face
        started = time.perf_counter()
        method = "infer" if verb == "POST" else "GET"
        try:
            body = self._body() if verb == "POST" else None
            status, reply = face.call(self.path.split("?")[0], verb, body, self._caller())
            code = "OK"
        except Exception as exc:  # the one place errors of this face meet the wire
            err = as_serving_error(exc, f"HTTP {verb}")
            status = HTTP_STATUS.get(err.code, HTTPStatus.INTERNAL_SERVER_ERROR)
            reply, code = {"error": err.message}, err.code.name
        face.metrics.observe_request(method, code, time.perf_counter() - started, PROTOCOL)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.face.max_body:
            raise invalid(f"the body of {length} bytes is over {self.server.face.max_body}")
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except json.JSONDecodeError as exc:
            raise invalid(f"the body is not JSON: {exc}") from None

    def _caller(self) -> Caller:
        route = self.headers.get(ROUTE_HEADER, "")
        if route and not ROUTE_KEY.fullmatch(route):
            raise invalid(f"{ROUTE_HEADER} must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -")
        return Caller(f"http:{self.client_address[0]}", "", route)


class OipHttp:
    """The REST face on ``host:port``, its handlers in threads, its work on ``loop``."""

    def __init__(
        self,
        servicer: OipServicer,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        max_body: int,
    ) -> None:
        self.servicer = servicer
        self.metrics = servicer.metrics
        self.loop = loop
        self.max_body = max_body
        self.httpd = _Server((host, port), _Handler)
        self.httpd.face = self
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        """Stop serving (blocks up to 50 ms: call it from a thread)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def call(self, path: str, verb: str, body: Any, caller: Caller) -> tuple[int, Any]:
        """Serve one request from a handler thread: (HTTP status, JSON reply)."""
        return self._on_loop(lambda: self._route(path, verb, body, caller))

    def _on_loop(self, make: Callable[[], Awaitable[tuple[int, Any]]]) -> tuple[int, Any]:
        async def run() -> tuple[int, Any]:
            return await make()

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return future.result(ANSWER_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ServingError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time; try again"
            ) from None

    async def _route(self, path: str, verb: str, body: Any, caller: Caller) -> tuple[int, Any]:
        s = self.servicer
        if verb == "GET" and path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/"):
            if path == "/v2/health/live":
                return HTTPStatus.OK, {"live": True}
            if path == "/v2/health/ready":
                ready = s.ready()
                return HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, {"ready": ready}
            server = s.server_metadata()
            return HTTPStatus.OK, {
                "name": server.name,
                "version": server.version,
                "extensions": list(server.extensions),
            }
        match = MODEL_PATH.fullmatch(path)
        if match is None:
            raise not_found(f"no such path {path!r}: see docs/oip.md for the /v2 paths")
        name, version, what = match.group(1), match.group(2) or "", match.group(3) or ""
        if verb == "POST" and what == "/infer":
            return HTTPStatus.OK, infer_json(await self._infer(name, version, body, caller))
        if verb != "GET" or what == "/infer":
            raise invalid(f"{verb} {path}: infer is POST, metadata and ready are GET")
        if what == "/ready":
            ready = s.model_ready(name, version)
            return HTTPStatus.OK if ready else HTTPStatus.NOT_FOUND, {"name": name, "ready": ready}
        meta = s.model_metadata(name, version)
        tensors = {
            key: [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                for t in getattr(meta, key)
            ]
            for key in ("inputs", "outputs")
        }
        return HTTPStatus.OK, {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            **tensors,
        }

    async def _infer(
        self, name: str, version: str, body: Any, caller: Caller
    ) -> oip.ModelInferResponse:
        request = infer_request(name, version, body)
        fut: asyncio.Future[oip.ModelInferResponse | ServingError] = self.loop.create_future()

        def done(result: oip.ModelInferResponse | ServingError) -> None:
            if not fut.done():
                fut.set_result(result)

        self.servicer.accept(request, caller, done, time.perf_counter())
        result = await fut
        if isinstance(result, ServingError):
            raise result
        return result
