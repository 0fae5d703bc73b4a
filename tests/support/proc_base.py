"""The base of tests/support/procs.py: one child process with a log file, started on free
ports and waited for until it is ready; see that module's docstring."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The health service name a replica reports (and Envoy checks).
SERVICE = "rnnserve.v1.InferenceService"


class ProcError(RuntimeError):
    """A process did not start, or did not get ready in time; the message has its log's tail."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binary(name: str, package: str) -> str:
    """The path of ``name``: next to this Python (the venv's bin), on the PATH, or in
    /usr/sbin. Skips the test when it is absent, or fails it under ``REQUIRE_TOOLS=1``."""
    for candidate in (Path(sys.executable).parent / name, Path("/usr/sbin") / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed ({package})"
    if os.environ.get("REQUIRE_TOOLS") == "1":
        pytest.fail(message + "; CI installs it in .ci/run")
    pytest.skip(message)


#: util-linux's setpriv sets PR_SET_PDEATHSIG and execs the command (no preexec_fn, which is
#: unsafe in a process with threads, as gRPC's): the kernel then kills the process when the
#: thread that started it exits.
SETPRIV = shutil.which("setpriv")


_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live)
    for p in procs:
        if p.poll() is None:
            p.kill()


class Proc:
    """One child process with a log file; subclasses know how to start it and when it is ready."""

    name = "proc"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    # Subclasses: the command line, and whether the process is ready yet.
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def _spawn(self, timeout: float) -> None:
        self._launch()
        self._wait_ready(timeout)

    def _launch(self) -> None:
        command = self.command()
        if SETPRIV and threading.current_thread() is threading.main_thread():
            command = [SETPRIV, "--pdeathsig", "KILL", "--", *command]
        with self.log_path.open("ab") as log:
            log.write(f"--- start: {' '.join(self.command())}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with _live_lock:
            _live.add(self.popen)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.popen.poll() if self.popen else None
            if code is not None:
                raise ProcError(f"{self.name} exited with {code} while starting\n{self.tail()}")
            try:
                if self.ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise ProcError(f"{self.name} not ready after {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.05)

    def log(self) -> str:
        """Everything the process wrote (stdout and stderr), over all its starts."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.kill()
            self.popen.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        self.signal(signal.SIGCONT)

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (after SIGCONT, in case it is paused) and wait up to ``timeout`` s; SIGKILL
        after that. Returns the exit code (negative: the signal that ended it)."""
        self.begin_terminate()
        return self.finish_terminate(timeout)

    def begin_terminate(self) -> None:
        """SIGCONT and SIGTERM without waiting (``finish_terminate`` waits): stopping several
        processes at once takes as long as the slowest, not the sum."""
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()

    def finish_terminate(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the exit after ``begin_terminate``; SIGKILL after that."""
        if self.popen is None:
            return None
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
        with _live_lock:
            _live.discard(self.popen)
        return self.popen.returncode

    def stop(self) -> None:
        """Stop it the polite way (SIGTERM, SIGKILL after 10 s)."""
        self.terminate(10.0)


def _start_with_free_ports(
    make: Callable[[], Proc], timeout: float, tries: int = 3, launched: Proc | None = None
) -> Any:
    """Start a process on freshly picked ports; pick again when another process took one of
    them between the pick and the bind (the log says the address is in use). ``launched``: a
    first attempt already launched, to wait for."""
    for attempt in range(tries):
        proc = launched if attempt == 0 and launched is not None else make()
        try:
            if proc.popen is None:
                proc._launch()
            proc._wait_ready(timeout)
            return proc
        except ProcError:
            log = proc.log().lower()
            if attempt + 1 == tries or "in use" not in log:
                raise
            proc.kill()
