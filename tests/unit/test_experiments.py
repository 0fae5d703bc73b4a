"""The long-lag experiment: fair budgets, and the whole code path at a tiny size."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rnnserve.client.cli import main
from rnnserve.export.experiments import (
    BEGIN,
    END,
    VARIANTS,
    ExperimentConfig,
    hidden_for_budget,
    parameter_count,
    run_experiment,
)
from rnnserve.export.model import build_model
from rnnserve.export.spec import CELL_KINDS, ModelSpec

TINY = ExperimentConfig(
    lags=(4, 6),
    cells=("rnn", "notes-gru"),
    seeds=(0,),
    params=200,
    steps=4,
    evals=2,
    batch_size=8,
    valid_size=32,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cell", CELL_KINDS)
def test_parameter_count_matches_the_model(cell: str) -> None:
    spec = ModelSpec(
        cell=cell, input_kind="features", input_size=2, hidden_size=7, layers=1, output_size=1
    )
    model = build_model(spec)
    # nn.GRU / nn.LSTM carry two bias vectors per gate where the notes' cells carry one.
    extra = 7 * {"gru": 3, "lstm": 4}.get(cell, 0)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cell, 7) + extra


def test_budget_gives_the_plain_rnn_a_wider_cell() -> None:
    sizes = {
        c: hidden_for_budget(c, 2500) for c in ("rnn", "notes-mingru", "notes-gru", "notes-lstm")
    }
    assert sizes["rnn"] > sizes["notes-mingru"] > sizes["notes-gru"] > sizes["notes-lstm"]
    for cell, hidden in sizes.items():
        assert abs(parameter_count(cell, hidden) - 2500) < 0.1 * 2500


def test_tiny_experiment_writes_table_plots_and_keeps_the_text(tmp_path: Path) -> None:
    page = tmp_path / "long-lag.md"
    page.write_text(f"# Long lags\n\nintro\n\n{BEGIN}\nSTALE-RESULTS\n{END}\n\nreading\n")
    outcomes = run_experiment(TINY, tmp_path, progress=False)
    assert {(o.cell, o.lag) for o in outcomes} == {
        (c, lag) for c in TINY.cells for lag in TINY.lags
    }
    assert all(len(o.curve) == TINY.evals and o.val_mse >= 0 for o in outcomes)
    text = page.read_text()
    assert text.startswith("# Long lags\n\nintro\n") and text.endswith("\nreading\n")
    assert "STALE-RESULTS" not in text
    assert "| rnn |" in text and "| notes-gru |" in text and "T = 6" in text
    for image in ("long-lag-mse.png", "long-lag-curves.png"):
        assert (tmp_path / "img" / image).read_bytes().startswith(b"\x89PNG")
    raw = json.loads((tmp_path / "long-lag.json").read_text())
    assert len(raw["runs"]) == len(outcomes)


def test_experiment_rejects_unknown_cells(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown cell kind"):
        run_experiment(ExperimentConfig(cells=("rnn", "gpt")), tmp_path, progress=False)
    assert not (tmp_path / "long-lag.md").exists()


def test_experiment_cli_bad_lags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["train", "adding", "--experiment", "--lags", "10,x", "--docs", str(tmp_path), "--quiet"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lags must be comma-separated integers" in err


def test_lstm_variants_map_to_their_output_forms() -> None:
    assert VARIANTS["notes-lstm"] == ("notes-lstm", "notes")
    assert VARIANTS["notes-lstm-tanh"] == ("notes-lstm", "tanh")
    assert parameter_count("notes-lstm-tanh", 9) == parameter_count("notes-lstm", 9)
    assert "notes-lstm-tanh" in ExperimentConfig().cells


def test_a_diverged_run_is_recorded_not_fatal(tmp_path: Path) -> None:
    # An absurd step size makes the loss overflow to inf within a few batches.
    config = replace(TINY, lags=(4,), cells=("rnn",), lr=1e19)
    [outcome] = run_experiment(config, tmp_path, progress=False)
    assert outcome.diverged and math.isnan(outcome.val_mse)
    assert "| rnn | diverged |" in (tmp_path / "long-lag.md").read_text()
    [run] = json.loads((tmp_path / "long-lag.json").read_text())["runs"]
    assert run["diverged"] is True and run["val_mse"] is None
