"""Server processes for the benchmarks: start on a free port, wait until ready, read CPU, stop.

Each server runs as its own process so its CPU time can be read from /proc/<pid>/stat alone,
apart from the client's. Output goes to a log file (never a pipe a busy server could fill).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import grpc
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
#: Seconds a server gets to load its models and answer GetModel.
READY_TIMEOUT_S = 90.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: A launch: given the port, the argv and extra environment of the server process.
Launch = Callable[[int], tuple[list[str], dict[str, str]]]

# `rnnserve serve` picks uvloop by itself whenever it is installed; to measure it on asyncio's
# default loop, the launcher makes `import uvloop` fail in the server process only.
_ASYNCIO_SERVE = (
    "import sys\n"
    "sys.modules['uvloop'] = None\n"
    "from rnnserve.client.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_command(
    version_dir: Path, uvloop: bool, busy_us: float = 0.0, run_model: bool = False
) -> Launch:
    """The echo server imitating the model version in ``version_dir``; with ``busy_us``, one
    that spins that long per message in place of a model run; with ``run_model``, one that
    runs the model on frames (the floor of a server that does)."""

    def launch(port: int) -> tuple[list[str], dict[str, str]]:
        argv = [sys.executable, str(HERE / "echo_server.py"), "--model-dir", str(version_dir)]
        argv += ["--port", str(port)] + (["--uvloop"] if uvloop else [])
        if busy_us:
            argv += ["--busy-us", f"{busy_us:.1f}"]
        if run_model:
            argv += ["--run-model"]
        return argv, {}

    return launch


def rnnserve_command(repo: Path, uvloop: bool) -> Launch:
    """``rnnserve serve`` on the repository, metrics on (a free port), logging at WARNING."""

    def launch(port: int) -> tuple[list[str], dict[str, str]]:
        head = ["-m", "rnnserve.client.cli"] if uvloop else ["-c", _ASYNCIO_SERVE]
        argv = [sys.executable, *head, "serve", "--models", str(repo), "--port", str(port)]
        env = {"RNNSERVE_METRICS_PORT": "0", "RNNSERVE_LOG_LEVEL": "WARNING"}
        return argv, env

    return launch


def _stat_cpu(path: str) -> float:
    """utime + stime of a /proc stat file, seconds."""
    stat = Path(path).read_text()
    # Fields after the command name, which is in parentheses and may hold spaces:
    # index 11 and 12 are utime and stime (fields 14 and 15 of proc(5)), in clock ticks.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class ServerProcess:
    """A server process, a context manager: started on enter, SIGTERM and reaped on exit."""

    def __init__(self, label: str, launch: Launch, log_dir: Path) -> None:
        self.label = label
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        argv, env = launch(self.port)
        self._log_path = log_dir / f"{label}-{self.port}.log"
        self._log = self._log_path.open("wb")
        self._proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the process wrote, for error messages."""
        self._log.flush()
        text = self._log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def log_contains(self, text: str) -> bool:
        """Whether the process has written ``text`` so far."""
        return text in self.log_tail(lines=1000)

    def check_alive(self) -> None:
        """RuntimeError with the log's tail when the process has exited."""
        code = self._proc.poll()
        if code is not None:
            raise RuntimeError(f"{self.label} server exited with {code}:\n{self.log_tail()}")

    def wait_ready(self, model: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until GetModel(model) answers; RuntimeError when it never does."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    stub.GetModel(pb.GetModelRequest(model=model), timeout=2.0)
                    return
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                    time.sleep(0.2)
        raise RuntimeError(f"{self.label} server not ready after {timeout_s:g} s ({last})")

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time so far, seconds: (the whole process, all threads; its main thread alone).

        Both servers run their event loop on the main thread, so the second figure is the
        loop's share; the rest is gRPC's own threads and, in rnnserve, the engine's worker.
        """
        return _stat_cpu(f"/proc/{self.pid}/stat"), _stat_cpu(
            f"/proc/{self.pid}/task/{self.pid}/stat"
        )

    def stop(self) -> None:
        """SIGTERM, a grace period, then SIGKILL; always closes the log."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
