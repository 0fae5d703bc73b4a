"""The ``rnnserve`` command line: one entry point, one sub-command per job.

Each sub-command lives with the package that does the work and exposes two functions,
``configure(parser)`` and ``run(args) -> int``; this module only wires them together, importing
each lazily so that ``rnnserve models`` never loads torch and ``rnnserve train`` never loads the
server. A sub-command reports bad input as one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

#: sub-command -> (module that implements it, one-line help, pip extra it needs)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("rnnserve.server.cli", "serve the models of a model repository over gRPC", ""),
    "probe": ("rnnserve.server.probe", "check that a server's gRPC health is SERVING", ""),
    "models": ("rnnserve.client.commands.models", "list the models a server serves", ""),
    "generate": ("rnnserve.client.commands.generate", "stream text from a char model", ""),
    "forecast": (
        "rnnserve.client.commands.forecast",
        "stream a CSV column through a forecaster",
        "",
    ),
    "bench": ("rnnserve.client.commands.bench", "measure step latency and throughput", ""),
    "train": ("rnnserve.export.cli_train", "train a model on a shipped data set", "train"),
    "export": ("rnnserve.export.cli_export", "export a trained checkpoint to ONNX", "train"),
}


class _Command(Protocol):
    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(name: str) -> _Command:
    module, _, extra = COMMANDS[name]
    try:
        return cast(_Command, importlib.import_module(module))
    except ModuleNotFoundError as exc:
        hint = f" (install it with: pip install 'rnnserve[{extra}]')" if extra else ""
        raise SystemExit(f"rnnserve {name}: needs the module {exc.name!r}{hint}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="rnnserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen sub-command's module is imported; the others show their help line.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_line, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if name == chosen:
            _load(name).configure(p)
    args = parser.parse_args(argv)
    try:
        return _load(args.command).run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
