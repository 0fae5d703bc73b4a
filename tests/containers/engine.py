"""Run real containers with podman (or docker) for the container tests.

The images come from ``make image-test`` (deploy/containers/images.sh); a test that finds one
missing fails and says so. Without a container engine the tests skip on a developer's machine
and fail in CI (``CI=true`` or ``REQUIRE_TOOLS=1``), where .ci/run installs podman.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_IMAGE = os.environ.get("RNNSERVE_TEST_IMAGE", "localhost/rnnserve:test")
# The label every container and network of these tests carries, so leftovers can be found.
LABEL = "rnnserve-test=1"


def engine_path() -> str:
    """The podman (else docker) executable; skip without one, fail in CI."""
    wanted = os.environ.get("ENGINE")
    found = shutil.which(wanted) if wanted else shutil.which("podman") or shutil.which("docker")
    if found:
        return found
    message = "the container tests need podman or docker (apt-get install podman)"
    required = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if required or os.environ.get("REQUIRE_TOOLS") == "1":
        pytest.fail(f"CI (or REQUIRE_TOOLS=1) is set and {message}", pytrace=False)
    pytest.skip(message)


def engine_env() -> dict[str, str]:
    """The environment for the engine: deploy/containers/containers.conf where podman needs it
    (as deploy/containers/env.sh decides: a hard open-files limit under podman's default)."""
    env = dict(os.environ)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    low = hard != resource.RLIM_INFINITY and hard < 1048576
    if "CONTAINERS_CONF" not in env and low:
        env["CONTAINERS_CONF"] = str(ROOT / "deploy" / "containers" / "containers.conf")
    return env


class Engine:
    """Thin wrapper over the engine's command line."""

    def __init__(self) -> None:
        self.path = engine_path()
        self.env = engine_env()

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.path, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            cwd=cwd,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{Path(self.path).name} {' '.join(args)} exited {done.returncode}: "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def require_image(self, image: str) -> None:
        """Fail with what to run when ``image`` has not been built."""
        if self("image", "inspect", image, check=False).returncode != 0:
            pytest.fail(
                f"image {image} is missing: build it with `make image-test` "
                "(or deploy/containers/images.sh after `make wheelhouse`)",
                pytrace=False,
            )

    def inspect(self, name: str) -> dict[str, Any]:
        """``inspect`` of one container or image, as a dict."""
        data: list[dict[str, Any]] = json.loads(self("inspect", name).stdout)
        return data[0]

    def run(self, image: str, *args: str, options: Sequence[str] = ()) -> str:
        """Start a detached container with the test label; its id."""
        out = self("run", "-d", "--label", LABEL, *options, image, *args).stdout
        return out.strip().splitlines()[-1]

    def host_port(self, container: str, port: int) -> int:
        """The 127.0.0.1 port the engine published ``port`` of ``container`` on."""
        out = self("port", container, f"{port}/tcp").stdout.strip().splitlines()[0]
        return int(out.rsplit(":", 1)[1])

    def logs(self, container: str) -> str:
        done = self("logs", container, check=False)
        return done.stdout + done.stderr

    def remove(self, container: str) -> None:
        self("rm", "-f", "-t", "0", container, check=False)


def wait_for(what: str, ready: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    """Poll ``ready`` until it is true; fail after ``timeout`` s with ``why()`` (logs)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:.0f} s:\n{why()}", pytrace=False)
        time.sleep(0.5)
