"""``rnnserve export CHECKPOINT --out MODELS_DIR --name N --version V [--form native|matmul]``.

Reads a training checkpoint (rnnserve.export.checkpoint), exports it to ``MODELS_DIR/N/V/`` with
the parity check, and prints one summary line. Bad input (a missing or foreign checkpoint, an
unknown cell kind, weights that do not fit, an unwritable or existing output folder, a parity
miss) is one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rnnserve.export.checkpoint import CheckpointError, load_checkpoint
from rnnserve.export.onnx_export import DEFAULT_OPSET, ExportError, export_onnx

EXIT_BAD_INPUT = 2


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the export options to ``parser``."""
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by 'rnnserve train'")
    parser.add_argument("--out", type=Path, required=True, help="the model repository (MODELS_DIR)")
    parser.add_argument("--name", required=True, help="model name: the folder under --out")
    parser.add_argument("--version", required=True, help="version: the folder under the name")
    parser.add_argument(
        "--form",
        choices=("native", "matmul"),
        default="native",
        help="native: one ONNX RNN/GRU/LSTM node per layer where exact (default); "
        "matmul: element-wise operators in a Scan, which every provider runs natively",
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="largest ONNX Runtime vs PyTorch difference accepted (default 1e-5)",
    )


def _fail(message: str) -> int:
    # One line, whatever the underlying library put in its message.
    print(f"rnnserve export: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run(args: argparse.Namespace) -> int:
    """Export the checkpoint; 0 on success, 2 on bad input (one line on stderr)."""
    try:
        model, info = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        return _fail(str(exc))
    vocabulary = info.get("vocabulary")
    try:
        manifest = export_onnx(
            model,
            args.out,
            name=args.name,
            version=args.version,
            form=args.form,
            vocabulary=list(vocabulary) if vocabulary is not None else None,
            dataset=info.get("dataset") or {},
            metrics=info.get("metrics") or {},
            opset=args.opset,
            tolerance=args.tolerance,
        )
    except ExportError as exc:
        return _fail(str(exc))
    parity = manifest.parity
    print(
        f"exported {manifest.cell} x{manifest.layers} (hidden {manifest.hidden_size}, "
        f"{manifest.onnx_form} form) to {Path(args.out) / manifest.name / manifest.version}; "
        f"parity max abs diff {parity['max_abs_diff']:.2e} <= {parity['tolerance']:.0e}"
    )
    return 0
