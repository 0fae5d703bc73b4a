"""The options of ``rnnserve train`` (cli_train.py runs them) and the per-task defaults.

Options left out on the command line take the task's value from ``DEFAULTS``; the notes' LSTM
with its own output takes ``NOTES_LSTM_DEFAULTS`` on top (``cli_train.build_config``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: per-task defaults for the options left out on the command line
DEFAULTS: dict[str, dict[str, Any]] = {
    "char": {"hidden": 128, "epochs": 8, "batch_size": 64, "bptt": 100, "lr": 3e-3, "clip": 1.0},
    "forecast": {
        "hidden": 32,
        "epochs": 30,
        "batch_size": 32,
        "bptt": 156,
        "lr": 3e-3,
        "clip": 1.0,
        "steps": 40,
    },
    "adding": {
        "hidden": 32,
        "epochs": 10,
        "batch_size": 64,
        "lr": 3e-3,
        "clip": 1.0,
        "steps": 50,
        "length": 50,
    },
}
#: what the notes' LSTM with its own output ``a = Γo ⊙ c`` gets instead of the task's Adam at
#: 3e-3: its activation is unbounded, and under Adam (lr 1e-4 to 3e-3, with or without warm-up
#: or an activation penalty) its memory cell ran away within the first epoch. Plain SGD moves
#: the weights by at most lr x clip a step: at clip 1 one short run still diverged, at 0.25
#: none did (docs/training.md, "The notes' LSTM")
NOTES_LSTM_DEFAULTS: dict[str, Any] = {"optimizer": "sgd", "lr": 1.0, "clip": 0.25}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the training options to ``parser``."""
    parser.add_argument("task", metavar="TASK", help="char, forecast, adding, or all")
    parser.add_argument(
        "--cell",
        default="notes-gru",
        help="rnn, notes-mingru, notes-gru, notes-lstm, gru or lstm (default notes-gru)",
    )
    parser.add_argument("--hidden", type=int, help="memory cell size (char 128, others 32)")
    parser.add_argument("--layers", type=int, default=1, help="stacked layers (default 1)")
    parser.add_argument("--epochs", type=int, help="epochs to train (the total, when resuming)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--optimizer",
        help="adam or sgd (default adam; notes-lstm with its notes output: "
        f"{NOTES_LSTM_DEFAULTS['optimizer']})",
    )
    parser.add_argument(
        "--lr",
        type=float,
        help="learning rate (default 3e-3; notes-lstm with its notes output: "
        f"{NOTES_LSTM_DEFAULTS['lr']})",
    )
    parser.add_argument(
        "--schedule",
        default="cosine",
        help="learning rate: cosine (lr down to lr/10 over the epochs) or constant",
    )
    parser.add_argument(
        "--clip",
        type=float,
        help="gradient norm clip (default 1; notes-lstm with its notes output: "
        f"{NOTES_LSTM_DEFAULTS['clip']})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="batches of linear learning-rate warm-up (default 0; notes-lstm with its notes "
        f"output: {NOTES_LSTM_DEFAULTS.get('warmup', 0)})",
    )
    parser.add_argument("--batch-size", type=int, help="sequences per batch")
    parser.add_argument(
        "--bptt", type=int, help="truncated BPTT length (char) or window length in weeks (forecast)"
    )
    parser.add_argument("--steps", type=int, help="batches per epoch (forecast, adding)")
    parser.add_argument("--length", type=int, help="adding problem sequence length")
    parser.add_argument("--embedding", type=int, default=32, help="char embedding size")
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="training only: share of the embedding's outputs and of the head's inputs zeroed "
        "(default 0)",
    )
    parser.add_argument(
        "--activation-penalty",
        type=float,
        help="adds this times the mean square of the top layer's activation at every step to "
        "the loss (default 0; notes-lstm with its notes output: "
        f"{NOTES_LSTM_DEFAULTS.get('activation_penalty', 0)})",
    )
    parser.add_argument(
        "--forget-bias",
        type=float,
        help="LSTMs: the forget gate's initial bias (default +1; notes-lstm with its notes "
        f"output: {NOTES_LSTM_DEFAULTS.get('forget_bias', 1)})",
    )
    parser.add_argument(
        "--lstm-output",
        default="notes",
        help="notes-lstm only: notes (a = Γo ⊙ c, as the notes write it; the default) or tanh "
        "(a = Γo ⊙ tanh c, the common form)",
    )
    parser.add_argument(
        "--residual",
        action="store_true",
        help="forecast: the model outputs this week's value plus a learned change",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="char, forecast: print the baselines on the task's validation split and exit",
    )
    parser.add_argument("--corpus", help="a UTF-8 text file instead of the shipped KJV slice")
    parser.add_argument("--corpus-limit", type=int, help="use only the first N characters")
    parser.add_argument(
        "--out", type=Path, help="run folder (default runs/<task>-<cell>); for 'all' the runs root"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: these small models gain little from more, and "
        "spinning threads on a shared machine cost much more)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--models",
        type=Path,
        default=Path("models"),
        help="all: the model repository to export into (default models)",
    )
    parser.add_argument(
        "--curves",
        type=Path,
        default=Path("docs/img"),
        help="all: where the loss curves are copied (default docs/img)",
    )
    parser.add_argument("--only", help="all: comma-separated shipped model names")
    parser.add_argument(
        "--experiment",
        action="store_true",
        help="adding: run the long-lag experiment (plain RNN vs gated cells)",
    )
    parser.add_argument(
        "--lags", default="10,25,50,100", help="experiment: sequence lengths (default 10,25,50,100)"
    )
    parser.add_argument("--seeds", default="0", help="experiment: seeds (default 0)")
    parser.add_argument(
        "--cells",
        default="rnn,notes-mingru,notes-gru,notes-lstm,notes-lstm-tanh",
        help="experiment: cells to compare (notes-lstm: the notes' output a = Γo ⊙ c; "
        "notes-lstm-tanh: a = Γo ⊙ tanh(c))",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=Path("docs"),
        help="experiment: folder for long-lag.md and img/ (default docs)",
    )
