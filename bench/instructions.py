"""Instructions per lone step, before and after: the A/B of bench/ab.py without the noise.

On this shared 2-CPU machine the same run's CPU time moves by a third from one minute to the
next, so bench/ab.py can only say "within the noise" about a change of a tenth. The number of
instructions a step executes does not move: this script counts them with valgrind's callgrind
(``--instr-atstart=no``, switched on with ``callgrind_control`` around the measured steps
only, so imports and model loading are not counted).

In each tree (the "before" commit's packages, extracted as bench/ab.py does, and this tree's),
one process loads the model into a real Repository, SessionManager and InferenceServicer, opens
one session and awaits ``InferenceServicer.Step`` for one-step chunks back to back, in process
(no gRPC: the transport is the same code in both trees): the path a lone session's step takes
at low load. ``--warmup`` steps first, then ``--steps`` measured. Hash randomization is fixed
(PYTHONHASHSEED=0) so both trees hash alike. Instructions are not time (a cache miss costs
more than an instruction); they show what a change adds or removes, with no noise.

Usage: ``python bench/instructions.py [--before COMMIT] [--quick] [--out docs/benchmarks.md]``.
Needs valgrind. A full run takes about 2 minutes (the two trees run in parallel); ``--quick``
about one. Writes the ``instructions`` section.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ab import PACKAGE_ROOTS, add_tree_options, extract
from report import RunInfo
from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench/instructions.py"

#: Run under callgrind in each tree: argv = tree, model folder, warmup steps, measured steps.
_CHILD = """\
import asyncio, os, subprocess, sys
from pathlib import Path
tree, folder = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
warmup, steps = int(sys.argv[3]), int(sys.argv[4])
import numpy as np
import rnnserve.server
found = Path(rnnserve.server.__path__[0]).resolve()
if tree not in found.parents:
    sys.exit(f"instructions: rnnserve.server came from {found}, not from {tree}")
from prometheus_client import CollectorRegistry
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.server.servicer import InferenceServicer
from rnnserve.server.sessions import SessionManager
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import to_tensor


def instrument(on):
    flag = "on" if on else "off"
    subprocess.run(["callgrind_control", "-i", flag, str(os.getpid())], check=True,
                   capture_output=True)


async def main():
    settings = Settings(models=folder.parent.parent, metrics_port=-1)
    metrics = Metrics(CollectorRegistry())
    repository = Repository(settings, metrics)
    model = repository.load_version(folder)
    sessions = SessionManager(metrics, 1e9, 16)
    servicer = InferenceServicer(repository, sessions, metrics)
    sid = sessions.open(model).id
    m = model.manifest
    x = (np.ones(1, np.int64) if m.input_kind == "tokens"
         else np.ones((1, m.input_size), np.float32))
    raw = [pb.StepRequest(session_id=sid, seq=i, inputs=to_tensor(x)).SerializeToString()
           for i in range(warmup + steps)]
    for i in range(warmup):
        await servicer.Step(pb.StepRequest.FromString(raw[i]), None)
    instrument(True)
    for i in range(warmup, warmup + steps):
        reply = await servicer.Step(pb.StepRequest.FromString(raw[i]), None)
        reply.SerializeToString()
    instrument(False)
    assert reply.next_seq == warmup + steps, reply.next_seq


asyncio.run(main())
"""


def count(tree: Path, folder: Path, warmup: int, steps: int, isolate: bool) -> int:
    """Instructions of ``steps`` lone steps served by ``tree``'s packages."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if isolate:
        env["PYTHONPATH"] = os.pathsep.join(str(tree / p) for p in PACKAGE_ROOTS)
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as tmp:
        argv = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={tmp}/callgrind.out", sys.executable, "-c", _CHILD,
            str(tree), str(folder), str(warmup), str(steps),
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1200)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the {tree} run failed (exit {done.returncode}): {tail}")
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count for {tree}")
    return int(found.group(1))


def render(
    counts: dict[str, int], ids: tuple[str, str], model: str, args: argparse.Namespace
) -> str:
    before, after = counts["before"] / args.steps, counts["after"] / args.steps
    info = RunInfo.collect("", "", os.getloadavg())
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    return "\n".join(
        [
            "## Instructions per lone step, before and after (bench/instructions.py)",
            "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: before = commit "
            f"{ids[0]}, after = commit {ids[1]}; model `{model}`; "
            f"{valgrind.stdout.strip()} (callgrind), {info.versions}.",
            "",
            f"One session's one-step chunks through `InferenceServicer.Step` in process, "
            f"{args.steps:,} counted after {args.warmup:,} uncounted"
            + ("; quick run" if args.quick else "")
            + ".",
            "",
            "| | instructions per step |",
            "|---|---:|",
            f"| before ({ids[0]}) | {before:,.0f} |",
            f"| after ({ids[1]}) | {after:,.0f} |",
            f"| after / before | {after / before:.3f}x |",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tree_options(parser)
    parser.add_argument("--steps", type=int, default=2000, help="steps counted")
    parser.add_argument("--warmup", type=int, default=200, help="steps before counting")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 200, 50
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions: valgrind is not installed (Debian: valgrind)", file=sys.stderr)
        return 2
    versions = sorted(p for p in (args.models / args.model).glob("*") if p.name.isdigit())
    if not versions:
        print(f"instructions: no model {args.model!r} in {args.models}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            before_id = extract(args.before, tmp / "before")
        except RuntimeError as exc:
            print(f"instructions: {exc}", file=sys.stderr)
            return 2
        after_id = RunInfo.collect("", "", os.getloadavg()).commit
        folder = tmp / "repo" / args.model / versions[-1].name
        shutil.copytree(versions[-1], folder)
        trees = {"before": (tmp / "before", True), "after": (ROOT, False)}
        try:
            with ThreadPoolExecutor(2) as pool:
                futures = {
                    label: pool.submit(count, tree, folder, args.warmup, args.steps, isolate)
                    for label, (tree, isolate) in trees.items()
                }
                counts = {label: f.result() for label, f in futures.items()}
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"instructions: {exc}", file=sys.stderr)
            return 1
    for label, total in counts.items():
        print(f"{label}: {total / args.steps:,.0f} instructions per step")
    body = render(counts, (before_id, after_id), f"{args.model}/{versions[-1].name}", args)
    write_section(args.out, "instructions", SCRIPT, body)
    print(f"wrote the instructions section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
