"""The long-lag experiment: does the plain RNN fail at long lags while the gated cells hold?

The notes motivate the GRU and the LSTM by the vanishing gradient of the plain RNN over long
time lags. This puts that to the test on the adding problem (datasets.adding_batch): each cell
kind is trained at each sequence length with the same budget (about the same number of
parameters, the same batches, the same optimiser and learning rate) and scored on the same
validation set. The results go to ``docs/long-lag.md`` (between marker comments, so the text
around them stays), ``docs/long-lag.json`` and two plots under ``docs/img/``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rnnserve.export.curves import save_figure
from rnnserve.export.spec import CELL_KINDS
from rnnserve.export.tasks import AddingTask, TaskOptions
from rnnserve.export.train import TrainConfig, fit, pick_device
from rnnserve.manifest import write_atomic
from tqdm import tqdm

#: the adding problem's trivial score: always predicting the mean sum 1.0 gives MSE 1/6
BASELINE_MSE = 1.0 / 6.0
#: a run counts as solving the task when its validation MSE is below this
SOLVED_MSE = 0.01
#: gate blocks per cell kind: each has that many [hidden x (hidden + input + 1)] blocks
GATE_BLOCKS = {"rnn": 1, "notes-mingru": 2, "notes-gru": 3, "notes-lstm": 4, "gru": 3, "lstm": 4}
#: the experiment's cell names: every cell kind (``notes-lstm`` with the notes' own output
#: ``a = Γo ⊙ c``), and ``notes-lstm-tanh``, the notes' LSTM with ``a = Γo ⊙ tanh(c)``;
#: each maps to (cell kind, lstm_output)
VARIANTS: dict[str, tuple[str, str]] = {
    **{c: (c, "notes" if c == "notes-lstm" else "tanh") for c in CELL_KINDS},
    "notes-lstm-tanh": ("notes-lstm", "tanh"),
}
BEGIN = "<!-- long-lag results: begin (written by rnnserve train adding --experiment) -->"
END = "<!-- long-lag results: end -->"


@dataclass(frozen=True)
class ExperimentConfig:
    """The grid and the shared budget. ``params`` is the parameter budget every cell gets
    (its hidden size is chosen to come closest); ``steps`` batches of ``batch_size``."""

    lags: tuple[int, ...] = (10, 25, 50, 100)
    cells: tuple[str, ...] = ("rnn", "notes-mingru", "notes-gru", "notes-lstm", "notes-lstm-tanh")
    seeds: tuple[int, ...] = (0,)
    params: int = 2500
    steps: int = 400
    evals: int = 8
    batch_size: int = 64
    lr: float = 1e-2
    clip: float = 1.0
    valid_size: int = 1000


@dataclass
class RunOutcome:
    """One cell at one lag with one seed: final validation numbers and the curve.

    A run whose training loss stopped being finite is ``diverged``; its numbers are NaN.
    """

    cell: str
    lag: int
    seed: int
    hidden: int
    params: int
    val_mse: float
    val_accuracy: float
    seconds: float
    curve: list[float] = field(default_factory=list)
    diverged: bool = False


def parameter_count(cell: str, hidden: int, inputs: int = 2, outputs: int = 1) -> int:
    """Weights of a one-layer model: gate blocks plus the linear head."""
    return GATE_BLOCKS[VARIANTS[cell][0]] * hidden * (hidden + inputs + 1) + outputs * (hidden + 1)


def hidden_for_budget(cell: str, params: int) -> int:
    """The hidden size whose parameter count comes closest to ``params``."""
    return min(range(1, 512), key=lambda h: abs(parameter_count(cell, h) - params))


def run_one(config: ExperimentConfig, cell: str, lag: int, seed: int) -> RunOutcome:
    """Train one cell kind at one lag; the validation set is the same for every run."""
    hidden = hidden_for_budget(cell, config.params)
    per_eval = max(1, config.steps // config.evals)
    options = TaskOptions(
        batch_size=config.batch_size,
        steps_per_epoch=per_eval,
        length=lag,
        valid_size=config.valid_size,
    )
    kind, lstm_output = VARIANTS[cell]
    train = TrainConfig(
        task="adding",
        cell=kind,
        lstm_output=lstm_output,
        hidden=hidden,
        epochs=config.evals,
        seed=seed,
        lr=config.lr,
        clip=config.clip,
        schedule="constant",
    )
    t0 = time.perf_counter()
    try:
        _, history = fit(AddingTask(options), train, device=pick_device())
    except FloatingPointError:
        return RunOutcome(
            cell=cell,
            lag=lag,
            seed=seed,
            hidden=hidden,
            params=parameter_count(cell, hidden),
            val_mse=math.nan,
            val_accuracy=math.nan,
            seconds=time.perf_counter() - t0,
            diverged=True,
        )
    last = history[-1].metrics
    return RunOutcome(
        cell=cell,
        lag=lag,
        seed=seed,
        hidden=hidden,
        params=parameter_count(cell, hidden),
        val_mse=last["val_mse"],
        val_accuracy=last["val_accuracy"],
        seconds=time.perf_counter() - t0,
        curve=[h.metrics["val_mse"] for h in history],
    )


def run_experiment(
    config: ExperimentConfig, docs: Path, *, progress: bool = True
) -> list[RunOutcome]:
    """Run the grid and write the results into ``docs`` (markdown, JSON, plots)."""
    unknown = [c for c in config.cells if c not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown cell kind(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}"
        )
    if not config.lags or min(config.lags) < 2:
        raise ValueError("--lags must be sequence lengths of at least 2")
    if not config.seeds:
        raise ValueError("--seeds must name at least one seed")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    grid = [(c, lag, s) for lag in config.lags for c in config.cells for s in config.seeds]
    outcomes: list[RunOutcome] = []
    bar = tqdm(grid, desc="long-lag", unit="run", disable=not progress, dynamic_ncols=True)
    for cell, lag, seed in bar:
        bar.set_postfix(cell=cell, lag=lag, seed=seed)
        outcomes.append(run_one(config, cell, lag, seed))
    bar.close()
    write_results(config, outcomes, docs)
    return outcomes


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarise(
    config: ExperimentConfig, outcomes: list[RunOutcome]
) -> dict[tuple[str, int], dict[str, float]]:
    """Per (cell, lag): mean MSE and accuracy over the seeds, and how many seeds solved it."""
    table: dict[tuple[str, int], dict[str, float]] = {}
    for cell in config.cells:
        for lag in config.lags:
            runs = [o for o in outcomes if o.cell == cell and o.lag == lag]
            table[cell, lag] = {
                "mse": _mean([o.val_mse for o in runs]),
                "accuracy": _mean([o.val_accuracy for o in runs]),
                "solved": float(sum(o.val_mse < SOLVED_MSE for o in runs)),
                "runs": float(len(runs)),
            }
    return table


def results_markdown(config: ExperimentConfig, outcomes: list[RunOutcome]) -> str:
    """The results section: setup, tables, plots and a verdict computed from the numbers."""
    table = summarise(config, outcomes)
    hidden = {c: hidden_for_budget(c, config.params) for c in config.cells}
    seconds = sum(o.seconds for o in outcomes)
    lines = [
        BEGIN,
        "",
        f"Setup: adding problem, {config.steps} batches of {config.batch_size} sequences per run, "
        f"Adam lr {config.lr}, gradient clip {config.clip}, seeds {list(config.seeds)}, "
        f"validation on the same {config.valid_size} sequences for every run; "
        f"about {config.params} parameters per model "
        f"({', '.join(f'{c} hidden {h}: {parameter_count(c, h)}' for c, h in hidden.items())}). "
        f"Mean-prediction baseline: MSE {BASELINE_MSE:.3f}. "
        f"Total training time {seconds / 60:.1f} min on {pick_device()}.",
        "",
        "Validation MSE (mean over seeds; lower is better; **bold** = every seed solved it, "
        f"MSE < {SOLVED_MSE}):",
        "",
        "| cell | " + " | ".join(f"T = {lag}" for lag in config.lags) + " |",
        "|---|" + "---:|" * len(config.lags),
    ]
    for cell in config.cells:
        cells = []
        for lag in config.lags:
            row = table[cell, lag]
            text = "diverged" if math.isnan(row["mse"]) else f"{row['mse']:.4f}"
            cells.append(f"**{text}**" if row["solved"] == row["runs"] else text)
        lines.append(f"| {cell} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Validation accuracy (share of sums within 0.04; mean over seeds):",
        "",
        "| cell | " + " | ".join(f"T = {lag}" for lag in config.lags) + " |",
        "|---|" + "---:|" * len(config.lags),
    ]
    for cell in config.cells:
        accs = [f"{table[cell, lag]['accuracy']:.3f}" for lag in config.lags]
        lines.append(f"| {cell} | " + " | ".join(accs) + " |")
    lines += ["", "![validation MSE by lag](img/long-lag-mse.png)", ""]
    lines += ["![learning curves at the longest lag](img/long-lag-curves.png)", "", "Verdict:", ""]
    for cell in config.cells:
        solved = [
            lag for lag in config.lags if table[cell, lag]["solved"] == table[cell, lag]["runs"]
        ]
        failed = [lag for lag in config.lags if table[cell, lag]["solved"] == 0]
        lines.append(
            f"- {cell}: solved at T = {', '.join(map(str, solved)) or 'none'}; "
            f"failed (no seed solved) at T = {', '.join(map(str, failed)) or 'none'}."
        )
    lines += ["", END]
    return "\n".join(lines)


def write_results(config: ExperimentConfig, outcomes: list[RunOutcome], docs: Path) -> None:
    """Plots, JSON, and the marked section of ``docs/long-lag.md`` (created if missing)."""
    plot_results(config, outcomes, docs / "img")
    # A diverged run's NaNs are written as null: NaN is not JSON.
    runs = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(o).items()}
        for o in outcomes
    ]
    raw: dict[str, Any] = {"config": asdict(config), "runs": runs}
    write_atomic(docs / "long-lag.json", (json.dumps(raw, indent=1) + "\n").encode())
    section = results_markdown(config, outcomes)
    page = docs / "long-lag.md"
    text = page.read_text() if page.exists() else "# The long-lag experiment\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_atomic(page, text.encode())


def plot_results(config: ExperimentConfig, outcomes: list[RunOutcome], img: Path) -> None:
    """``long-lag-mse.png`` (final MSE against lag) and ``long-lag-curves.png`` (longest lag)."""
    table = summarise(config, outcomes)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for cell in config.cells:
        ax.plot(config.lags, [table[cell, lag]["mse"] for lag in config.lags], "o-", label=cell)
    ax.axhline(BASELINE_MSE, color="grey", linestyle="--", label="predict the mean")
    ax.axhline(SOLVED_MSE, color="grey", linestyle=":", label="solved")
    ax.set_xlabel("sequence length T (the lag to bridge is between T/2 and T)")
    ax.set_ylabel("validation MSE")
    ax.set_yscale("log")
    ax.set_title("Adding problem: final validation MSE, same budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, img / "long-lag-mse.png")

    longest = max(config.lags)
    per_eval = max(1, config.steps // config.evals)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colours = dict(
        zip(config.cells, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False)
    )
    for o in outcomes:
        if o.lag == longest:
            xs = [per_eval * (i + 1) for i in range(len(o.curve))]
            label = o.cell if o.seed == config.seeds[0] else None
            ax.plot(xs, o.curve, "o-", color=colours.get(o.cell), alpha=0.8, label=label)
    ax.axhline(BASELINE_MSE, color="grey", linestyle="--", label="predict the mean")
    ax.set_xlabel("training batches")
    ax.set_ylabel("validation MSE")
    ax.set_yscale("log")
    ax.set_title(f"Adding problem, T = {longest}: learning curves (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, img / "long-lag-curves.png")
