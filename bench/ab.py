"""Before/after A/B of the server code: an older commit's ``rnnserve serve`` against this tree's.

Extracts the packages of the "before" commit (``git archive`` of proto/ server/ client/
export/, default 2e74064) into a temporary folder and runs its server with the same .venv
Python, its package roots first on PYTHONPATH (the project is installed in development mode,
a .pth file naming this tree's package roots, which PYTHONPATH entries precede); the "after"
server is this working tree's. Each server process checks at start that it imported
``rnnserve.server`` from the tree it is meant to, and fails otherwise. Both serve a private copy
of the same model (shipped ``char-gru``) and stay up for the whole run, on the same event loop
(uvloop by default, client and both servers alike).

The load is ``rnnserve bench``'s closed loop (one step per message, one Stream per session) at
1, 64 and 256 sessions, measured by bench/step_latency.py's ``measure``: steps/s, round trip
p50/p99 and the server process's CPU per step from /proc. At each size the two servers run
back to back for several rounds in ABBA order (before, after, after, before, ...); each ratio
after / before is taken within a round's adjacent pair, then the median over the rounds with
the lowest and highest round beside it. A change is called beyond the noise only when every
round moved the same way; the per-round range is the noise the run saw.

Usage: ``python bench/ab.py [--before COMMIT] [--quick] [--out docs/benchmarks.md]``. A full
run takes about 4 minutes; ``--quick`` about 30 seconds. Writes the ``ab`` section.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from report import Measurement, Ratios, RunInfo
from rnnserve.client.commands.bench import BenchError
from sections import load_text, ratio_text, write_section
from servers import Launch, ServerProcess
from step_latency import combine, measure

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("proto", "server", "client", "export")
SCRIPT = "bench/ab.py"

#: Run in each server process: refuse to serve code from another tree than ``tree``.
_BOOT = """\
import sys
from pathlib import Path
import rnnserve.server
tree = Path(sys.argv.pop(1)).resolve()
found = Path(rnnserve.server.__path__[0]).resolve()
if tree not in found.parents:
    sys.exit(f"ab: rnnserve.server came from {found}, not from {tree}")
from rnnserve.client.cli import main
sys.exit(main(sys.argv[1:]))
"""


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def extract(commit: str, into: Path) -> str:
    """The package roots of ``commit`` under ``into``; the commit's short id."""
    short = git("rev-parse", "--short", f"{commit}^{{commit}}")
    into.mkdir(parents=True)
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        done = subprocess.run(
            ["git", "archive", "--format=tar", short, *PACKAGE_ROOTS], cwd=ROOT, stdout=out
        )
    if done.returncode != 0:
        raise RuntimeError(f"git archive {short} failed")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    archive.unlink()
    return short


def serve_command(tree: Path, repo: Path, loop: str, isolate: bool) -> Launch:
    """``rnnserve serve`` from ``tree``'s packages (``isolate``: they lead PYTHONPATH)."""

    def launch(port: int) -> tuple[list[str], dict[str, str]]:
        argv = [sys.executable, "-c", _BOOT, str(tree), "serve", "--models", str(repo)]
        env = {
            "RNNSERVE_METRICS_PORT": "0",
            "RNNSERVE_LOG_LEVEL": "WARNING",
            "RNNSERVE_LOOP": loop,
        }
        if isolate:
            env["PYTHONPATH"] = os.pathsep.join(str(tree / p) for p in PACKAGE_ROOTS)
        return [*argv, "--port", str(port)], env

    return launch


@dataclass(frozen=True)
class Row:
    sessions: int
    before: Measurement
    after: Measurement
    ratios: Ratios


def run_ab(args: argparse.Namespace, before: ServerProcess, after: ServerProcess) -> list[Row]:
    rows = []
    uvloop = args.loop == "uvloop"
    for sessions in args.sessions:
        done: dict[str, list[Measurement]] = {"before": [], "after": []}
        for r in range(args.rounds):
            for server in (before, after) if r % 2 == 0 else (after, before):
                done[server.label].append(measure(server, args.model, sessions, 0, args, uvloop))
        row = Row(
            sessions,
            combine(done["before"]),
            combine(done["after"]),
            Ratios.of(done["after"], done["before"]),
        )
        rows.append(row)
        r = row.ratios
        print(
            f"{sessions:4} sessions  after/before: steps/s {ratio_text(r.steps_per_s)}  "
            f"p50 {ratio_text(r.p50)}  p99 {ratio_text(r.p99)}  "
            f"server CPU/step {ratio_text(r.server_cpu)}",
            flush=True,
        )
    return rows


def verdict(value: tuple[float, float, float], higher_is_better: bool) -> str:
    """Beyond the noise only when every round moved the same way."""
    _, low, high = value
    if (high < 1.0) if higher_is_better else (low > 1.0):
        return "**worse in every round**"
    if (low > 1.0) if higher_is_better else (high < 1.0):
        return "better in every round"
    return "within the noise"


def render(
    rows: list[Row], info: RunInfo, load: str, ids: tuple[str, str], args: argparse.Namespace
) -> str:
    lines = [
        "## Before/after A/B of the server's hot path (bench/ab.py)",
        "",
        f"Measured {info.date}: before = commit {ids[0]}, after = commit {ids[1]}; "
        f"model {info.model}; {args.loop} (client and both servers).",
        "",
        f"- Machine: {info.cpu_model}, {info.cpus} CPUs, shared by the client and both "
        f"servers; {load}.",
        f"- Versions: {info.versions}.",
        f"- Runs: {info.settings}.",
        "",
        "| sessions | steps/s before / after | p50 µs before / after | server CPU µs/step "
        "before / after |",
        "|---:|---:|---:|---:|",
    ]
    for row in rows:
        b, a = row.before, row.after
        errors = b.errors + a.errors
        lines.append(
            f"| {row.sessions}{f' ({errors} errors)' if errors else ''} | "
            f"{b.steps_per_s:,.0f} / {a.steps_per_s:,.0f} | {b.p50_us:,.0f} / {a.p50_us:,.0f} | "
            f"{b.server_cpu_us_per_step:.1f} / {a.server_cpu_us_per_step:.1f} |"
        )
    lines += [
        "",
        "After / before, median of the rounds (lowest-highest round); a change is beyond the "
        "noise only when every round moved the same way:",
        "",
        "| sessions | steps/s | p50 | p99 | server CPU per step |",
        "|---:|---|---|---|---|",
    ]
    for row in rows:
        r = row.ratios
        lines.append(
            f"| {row.sessions} | {ratio_text(r.steps_per_s)}, {verdict(r.steps_per_s, True)} | "
            f"{ratio_text(r.p50)}, {verdict(r.p50, False)} | "
            f"{ratio_text(r.p99)}, {verdict(r.p99, False)} | "
            f"{ratio_text(r.server_cpu)}, {verdict(r.server_cpu, False)} |"
        )
    return "\n".join(lines)


def add_tree_options(parser: argparse.ArgumentParser) -> None:
    """The options of a before/after comparison (this script and bench/instructions.py)."""
    parser.add_argument("--before", default="2e74064", help="the commit measured as 'before'")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="char-gru", help="model name in --models")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tree_options(parser)
    parser.add_argument("--sessions", default="1,64,256", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=6, help="before/after pairs, ABBA order")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per run")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    args = parser.parse_args(argv)
    try:
        args.sessions = [int(s) for s in args.sessions.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sessions {args.sessions!r} must be comma-separated integers")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.quick:
        args.seconds, args.warmup, args.rounds = 1.0, 0.5, 2
    args.chunk = 1  # what step_latency.measure reads
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    source = args.models / args.model
    if not source.is_dir():
        print(f"ab: no model {args.model!r} in {args.models}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ab-")))
        try:
            before_id = extract(args.before, tmp / "before")
        except RuntimeError as exc:
            print(f"ab: {exc}", file=sys.stderr)
            return 2
        after_id = RunInfo.collect("", "", load_before).commit
        shutil.copytree(source, tmp / "repo" / args.model)
        logs = tmp / "logs"
        logs.mkdir()
        before = stack.enter_context(
            ServerProcess(
                "before", serve_command(tmp / "before", tmp / "repo", args.loop, True), logs
            )
        )
        after = stack.enter_context(
            ServerProcess("after", serve_command(ROOT, tmp / "repo", args.loop, False), logs)
        )
        try:
            for server in (before, after):
                server.wait_ready(args.model)
            rows = run_ab(args, before, after)
        except (BenchError, RuntimeError) as exc:
            print(f"ab: {exc}", file=sys.stderr)
            return 1
    info = RunInfo.collect(
        model=f"`{args.model}`",
        settings=(
            f"{args.rounds} round(s) per size in ABBA order, each run a {args.seconds:g} s "
            f"window after {args.warmup:g} s warmup, one step per message, one Stream per "
            "session" + (", quick run" if args.quick else "")
        ),
        load_before=load_before,
    )
    body = render(rows, info, load_text(load_before), (before_id, after_id), args)
    write_section(args.out, "ab", SCRIPT, body)
    print(f"wrote the ab section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
