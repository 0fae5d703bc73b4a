"""Measure export parity for every cell kind and form; prints the table in docs/models.md.

    python -m rnnserve.export.parity_table [--hidden 128] [--layers 2]

Random models (seeded), no files written: each graph is built in memory and run through the same
check_parity that every export must pass. "x3" multiplies every weight by 3, which drives the
gates out of their linear range the way trained weights do.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from rnnserve.export.model import build_model
from rnnserve.export.onnx_export import DEFAULT_OPSET, build_onnx, resolve_form
from rnnserve.export.parity import check_parity, one_torch_thread
from rnnserve.export.spec import ModelSpec
from rnnserve.manifest import Scaling

#: (cell, lstm_output) in table order
VARIANTS: tuple[tuple[str, str], ...] = (
    ("rnn", "tanh"),
    ("notes-mingru", "tanh"),
    ("notes-gru", "tanh"),
    ("notes-lstm", "notes"),
    ("notes-lstm", "tanh"),
    ("gru", "tanh"),
    ("lstm", "tanh"),
)


def measure(
    cell: str, lstm_output: str, form: str, kind: str, hidden: int, layers: int, scale: float
) -> tuple[str, float, float]:
    """(form built, output diff, state diff) for one random model."""
    torch.manual_seed(0)
    tokens = kind == "tokens"
    spec = ModelSpec(
        cell=cell,
        input_kind="tokens" if tokens else "features",
        input_size=64 if tokens else 3,
        hidden_size=hidden,
        layers=layers,
        output_size=64 if tokens else 1,
        embedding_dim=32 if tokens else 0,
        lstm_output="notes" if lstm_output == "notes" else "tanh",
    )
    model = build_model(
        spec,
        input_scaling=None if tokens else Scaling([350.0, 0.0, 10.0], [20.0, 1.0, 5.0]),
        output_scaling=None if tokens else Scaling([350.0], [20.0]),
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    built = resolve_form(cell, form)
    proto = build_onnx(model, form=built, opset=DEFAULT_OPSET, metadata={})
    report = check_parity(model, proto.SerializeToString(), tolerance=1.0)
    return built, report.output_max_abs_diff, report.state_max_abs_diff


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    print(
        f"hidden {args.hidden}, {args.layers} layers; max abs diff ONNX Runtime (CPU) vs "
        "PyTorch, outputs in normalised units / states"
    )
    print()
    print(
        "| cell | form asked | form built | tokens | tokens, weights x3 | features | features x3 |"
    )
    print("|---|---|---|---|---|---|---|")
    with one_torch_thread():
        for cell, lstm_output in VARIANTS:
            label = f"{cell} ({lstm_output})" if cell == "notes-lstm" else cell
            for form in ("native", "matmul"):
                cols, built = [], form
                for kind in ("tokens", "features"):
                    for scale in (1.0, 3.0):
                        built, out, st = measure(
                            cell, lstm_output, form, kind, args.hidden, args.layers, scale
                        )
                        cols.append(f"{out:.1e} / {st:.1e}")
                print(f"| {label} | {form} | {built} | {' | '.join(cols)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
