"""Time from process start to SERVING: ``rnnserve serve`` with the shipped models, ``--port 0``.

Each run starts ``.venv/bin/rnnserve serve --models <copy of models/> --port 0`` (the console
script a user runs) and reads its standard output: the banner comes once the server serves,
and names the port. The clock starts just before the process is spawned and stops when a gRPC
health Check of the overall service (``""``) on that port answers SERVING, which it does from
the moment the banner is printed (the server sets SERVING, then prints it); the banner's own
arrival is reported beside it. The figure is the median of several runs.

Then, to show where the time goes, a fresh interpreter (the same Python) times the phases of
a start one by one: importing the packages ``serve`` needs, and for each model version loading
its manifest, building its ONNX Runtime session (``Engine``: the graph load, a profiled
one-step run) and its self-check against ``golden.npz``; and ``python -X importtime`` lists the
slowest imports. The results go between the ``startup`` markers of docs/benchmarks.md.

Usage: ``python bench/startup.py [--runs 7] [--quick] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sections import load_text, write_section

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench/startup.py"
TARGET_S = 1.0
BANNER_PORT = "gRPC     listening on "

#: Run in a fresh interpreter: the phases of a start, timed one by one (JSON on stdout).
_PHASES = """\
import json, sys, time
t = time.perf_counter()
import rnnserve.client.cli, rnnserve.server.cli, rnnserve.server.app
from rnnserve.manifest import load_manifest
from rnnserve.server.engine import Engine, choose_providers
from rnnserve.server.golden import self_check
from rnnserve.server.settings import Settings
phases = {"imports": time.perf_counter() - t}
settings = Settings(models=sys.argv[1])
t = time.perf_counter()
providers = choose_providers(settings.provider_list())
phases["choose providers"] = time.perf_counter() - t
models = []
for folder in sorted(p for p in __import__("pathlib").Path(sys.argv[1]).glob("*/*") if p.is_dir()):
    t0 = time.perf_counter()
    manifest = load_manifest(folder)
    t1 = time.perf_counter()
    engine = Engine(folder, manifest, providers, settings.intra_op_threads)
    t2 = time.perf_counter()
    self_check(engine, settings.self_check_tolerance)
    t3 = time.perf_counter()
    models.append([f"{folder.parent.name}/{folder.name}", t1 - t0, t2 - t1, t3 - t2])
print(json.dumps({"phases": phases, "models": models}))
"""


def rnnserve_executable() -> str:
    """The console script beside this Python (what ``make serve`` runs)."""
    script = Path(sys.executable).with_name("rnnserve")
    if not script.exists():
        raise SystemExit(f"startup: no {script}; install the project (make install)")
    return str(script)


def serving(port: int, deadline: float) -> bool:
    """Whether the health Check of the overall service answers SERVING before ``deadline``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            except grpc.RpcError:
                time.sleep(0.005)
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return True
            time.sleep(0.005)
    return False


def environment(pycache: Path | None) -> dict[str, str]:
    """This environment, or with ``pycache`` a bytecode cache there (PYTHONPYCACHEPREFIX,
    PYTHONDONTWRITEBYTECODE unset): what an installed server has after its first start."""
    env = {**os.environ, "RNNSERVE_METRICS_PORT": "0"}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def one_start(
    repo: Path, pycache: Path | None = None, timeout_s: float = 60.0
) -> tuple[float, float]:
    """(seconds to the banner, seconds to SERVING on health) of one ``rnnserve serve``."""
    argv = [rnnserve_executable(), "serve", "--models", str(repo), "--port", "0"]
    env = environment(pycache)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        banner = port = None
        for line in proc.stdout:
            if BANNER_PORT in line:
                banner = time.perf_counter() - t0
                port = int(line.split(BANNER_PORT, 1)[1].split()[0].rsplit(":", 1)[1])
                break
        if banner is None or port is None:
            raise RuntimeError(f"rnnserve serve printed no banner (exit code {proc.poll()})")
        if not serving(port, t0 + timeout_s):
            raise RuntimeError(f"health on port {port} never answered SERVING")
        return banner, time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def phases(repo: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _PHASES, str(repo)], capture_output=True, text=True, check=True
    )
    data: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


def slowest_imports(top: int = 12) -> tuple[list[tuple[str, float]], float]:
    """What ``serve``'s imports cost by top-level package (``rnnserve.server``,
    ``rnnserve.client`` and ``rnnserve.v1`` apart), from ``python -X importtime``: each module's
    own time added to its package's, so the figures add up to the total (also returned),
    seconds. The ``top`` largest, largest first."""
    code = "import rnnserve.client.cli, rnnserve.server.cli, rnnserve.server.app"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    totals: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, _, name = (part.strip() for part in line[len("import time:") :].split("|"))
        parts = name.split(".")
        package = ".".join(parts[:2]) if parts[0] == "rnnserve" and len(parts) > 2 else parts[0]
        totals[package] = totals.get(package, 0.0) + int(own) / 1e6
    ranked = sorted(totals.items(), key=lambda r: -r[1])
    return ranked[:top], sum(totals.values())


def _summary(runs: list[tuple[float, float]]) -> str:
    to_serving = statistics.median(r[1] for r in runs)
    verdict = "met" if to_serving < TARGET_S else "**missed**"
    return (
        f"**{to_serving:.2f} s** median of {len(runs)} runs (range "
        f"{min(r[1] for r in runs):.2f}-{max(r[1] for r in runs):.2f} s; the banner came at "
        f"{statistics.median(r[0] for r in runs):.2f} s median); under {TARGET_S:g} s: {verdict}"
    )


def render(
    runs: dict[bool, list[tuple[float, float]]], breakdown: dict[str, object],
    imports: tuple[list[tuple[str, float]], float], load: str, models: list[str], quick: bool,
) -> str:  # fmt: skip
    dont_write = os.environ.get("PYTHONDONTWRITEBYTECODE")
    as_is = (
        "PYTHONDONTWRITEBYTECODE is set here, so rnnserve's own modules (never installed as "
        "bytecode: a development install) are compiled at every start"
        if dont_write
        else "bytecode is cached as Python does by default"
    )
    lines = [
        "## Time from process start to SERVING (bench/startup.py)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
        f"{len(os.sched_getaffinity(0))} CPUs; {load}" + ("; quick run" if quick else "") + ".",
        "",
        f"`rnnserve serve --models <copy of models/> --port 0` with the {len(models)} shipped "
        f"model versions ({', '.join(models)}), from spawning the process to a gRPC health "
        "Check answering SERVING, the two ways below alternated (ABBA):",
        "",
        f"- as this environment runs it ({as_is}): {_summary(runs[False])};",
        "- with a bytecode cache for every module (PYTHONPYCACHEPREFIX, filled by an unmeasured "
        f"first start: what an installed server has from its second start on): "
        f"{_summary(runs[True])}.",
        "",
        "Where the time goes (one fresh interpreter as this environment runs it, each phase "
        "timed alone, seconds):",
        "",
        "| phase | s |",
        "|---|---:|",
    ]
    phase_times = breakdown["phases"]
    assert isinstance(phase_times, dict)
    for name, seconds in phase_times.items():
        lines.append(f"| {name} | {seconds:.3f} |")
    model_rows = breakdown["models"]
    assert isinstance(model_rows, list)
    totals = [sum(row[1:]) for row in model_rows]
    for label, manifest_s, engine_s, check_s in model_rows:
        lines.append(
            f"| load {label}: manifest {manifest_s:.3f}, ONNX Runtime session {engine_s:.3f}, "
            f"self-check {check_s:.3f} | {manifest_s + engine_s + check_s:.3f} |"
        )
    lines += [
        f"| all model loads | {sum(totals):.3f} |",
        "",
        f"The imports by package (`python -X importtime`, each module's own time added to its "
        f"top-level package's; {imports[1]:.3f} s in all under importtime, which slows them): "
        + ", ".join(f"{name} {seconds:.3f}" for name, seconds in imports[0])
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--runs", type=int, default=7, help="starts to take the median of")
    parser.add_argument("--quick", action="store_true", help="three starts")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        repo = Path(tmp) / "models"
        shutil.copytree(args.models, repo, ignore=shutil.ignore_patterns(".*"))
        models = sorted(f"{p.parent.name}/{p.name}" for p in repo.glob("*/*") if p.is_dir())
        if not models:
            print(f"startup: no model versions in {args.models}", file=sys.stderr)
            return 2
        pycache = Path(tmp) / "pycache"
        for cache in (None, pycache):  # unmeasured: the page cache (and the .pyc files) warm
            one_start(repo, cache)
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for i in range(2 * args.runs):  # ABBA: drift of the machine hits both alike
            cached = (i % 4) in (1, 2)
            runs[cached].append(one_start(repo, pycache if cached else None))
            banner, serving_s = runs[cached][-1]
            what = "bytecode cache" if cached else "as this environment runs"
            print(f"{what}: banner {banner:.3f} s, SERVING {serving_s:.3f} s", flush=True)
        breakdown = phases(repo)
    imports = slowest_imports()
    body = render(runs, breakdown, imports, load_text(before), models, args.quick)
    print(body)
    write_section(args.out, "startup", SCRIPT, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
