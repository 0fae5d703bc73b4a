"""``rnnserve models``: a table of the models a server serves."""

from __future__ import annotations

import argparse

from ..client import Client
from ..models import ModelInfo
from ._common import add_server_options, client_options, run_command

_COLUMNS = ("MODEL", "VERSION", "CELL", "INPUT", "OUTPUT", "STATE", "PROVIDER")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rnnserve models``."""
    add_server_options(parser)


def _row(m: ModelInfo) -> tuple[str, ...]:
    inputs = f"text, {len(m.vocabulary)} symbols" if m.is_tokens else m.input.describe()
    output = f"{m.output_kind} {m.output.describe()}"
    state = ", ".join(f"{s.name} {list(s.shape)}" for s in m.states)
    provider = m.provider.removesuffix("ExecutionProvider") or "-"
    return (m.name, m.version, m.cell, inputs, output, state, provider)


def format_table(models: list[ModelInfo]) -> str:
    """The models as an aligned text table, one row per model version."""
    rows = [_COLUMNS, *(_row(m) for m in sorted(models, key=lambda m: (m.name, m.version)))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def run(args: argparse.Namespace) -> int:
    """Print the table; 1 with one line on stderr when the server cannot be reached."""

    def body() -> int:
        with Client(client_options(args)) as client:
            models = client.models()
        if not models:
            print(f"the server at {args.server} serves no models")
            return 0
        print(format_table(models))
        return 0

    return run_command("models", body)
