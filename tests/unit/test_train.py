"""Training: deterministic, resumable, checkpoints that refuse another architecture, a CLI whose
bad input is one line and exit code 2 with nothing written, and the shipped-model export path."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rnnserve.client.cli import main
from rnnserve.export.checkpoint import CheckpointError, load_checkpoint
from rnnserve.export.runs import run_training
from rnnserve.export.shipped import export_run
from rnnserve.export.spec import ModelSpec
from rnnserve.export.tasks import TaskOptions, make_task
from rnnserve.export.train import TrainConfig, fit, new_model, warmup_factor
from rnnserve.manifest import load_manifest

TINY_CHAR = TrainConfig(
    task="char",
    cell="notes-gru",
    hidden=16,
    epochs=2,
    seed=0,
    options=TaskOptions(batch_size=4, bptt=16, embedding_dim=8, corpus_limit=3000),
)
CHAR_ARGS = [
    "train",
    "char",
    "--hidden",
    "16",
    "--batch-size",
    "4",
    "--bptt",
    "16",
    "--embedding",
    "8",
    "--corpus-limit",
    "3000",
    "--epochs",
    "1",
    "--quiet",
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


cpu = torch.device("cpu")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights() -> None:
    task = make_task("char", TINY_CHAR.options)
    a, _ = fit(task, TINY_CHAR, device=torch.device("cpu"))
    b, _ = fit(task, TINY_CHAR, device=torch.device("cpu"))
    c, _ = fit(task, replace(TINY_CHAR, seed=1), device=torch.device("cpu"))
    assert same_weights(weights(a), weights(b))
    assert not same_weights(weights(a), weights(c))


def test_dropout_is_seeded_and_leaves_no_trace_in_the_model() -> None:
    task = make_task("char", TINY_CHAR.options)
    dropped = replace(TINY_CHAR, dropout=0.3)
    a, history = fit(task, dropped, device=cpu)
    b, _ = fit(task, dropped, device=cpu)
    plain, plain_history = fit(task, TINY_CHAR, device=cpu)
    assert same_weights(weights(a), weights(b))  # the masks come from the epoch's seed
    assert not same_weights(weights(a), weights(plain))  # and they did change the training
    assert history[0].train_loss != plain_history[0].train_loss
    # The hooks lived for the epoch only: the trained model computes as one built without them.
    assert not a.head._forward_pre_hooks and a.embedding is not None
    assert not a.embedding._forward_hooks
    _, fresh = new_model(task, dropped)
    fresh.load_state_dict(a.state_dict())
    fresh.eval()
    x = torch.from_numpy(task.corpus.valid[:40].reshape(20, 2).copy())  # type: ignore[attr-defined]
    with torch.no_grad():
        assert torch.equal(a(x)[0], fresh(x)[0])
    assert history[-1].metrics == task.evaluate(a, cpu)


def test_char_loss_goes_down() -> None:
    options = replace(TINY_CHAR.options, batch_size=16, bptt=32, corpus_limit=20000)
    config = replace(TINY_CHAR, epochs=3, lr=1e-2, options=options)
    _, history = fit(make_task("char", config.options), config, device=torch.device("cpu"))
    vocab = len(make_task("char", config.options).vocabulary or [])
    # Uniform guessing costs ln(vocab) nats per character; training must beat it clearly.
    assert history[-1].metrics["val_loss"] < math.log(vocab) - 0.5
    assert history[-1].metrics["val_bpc"] == pytest.approx(
        history[-1].metrics["val_loss"] / math.log(2)
    )
    assert history[-1].train_loss < history[0].step_losses[0]


def test_resume_reaches_the_uninterrupted_result(tmp_path: Path) -> None:
    whole = run_training(TINY_CHAR, tmp_path / "whole", progress=False, log=lambda _: None)
    one = replace(TINY_CHAR, epochs=1)
    run_training(one, tmp_path / "split", progress=False, log=lambda _: None)
    resumed = run_training(
        TINY_CHAR, tmp_path / "split", resume=True, progress=False, log=lambda _: None
    )
    a, info_a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b, info_b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert info_a["epoch"] == info_b["epoch"] == 2
    assert same_weights(weights(a), weights(b))
    assert resumed.history[-1].metrics == whole.history[-1].metrics
    assert [h.epoch for h in resumed.history] == [1, 2]
    history = json.loads((tmp_path / "split" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (tmp_path / "split" / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_checkpoint_holds_what_export_needs(tmp_path: Path) -> None:
    run_training(TINY_CHAR, tmp_path / "run", progress=False, log=lambda _: None)
    model, info = load_checkpoint(tmp_path / "run" / "best.pt")
    task = make_task("char", TINY_CHAR.options)
    assert info["vocabulary"] == task.vocabulary
    assert info["dataset"]["name"] == "kjv-genesis-exodus"
    assert set(info["metrics"]) == {"val_loss", "val_bpc"}
    assert isinstance(info["spec"], ModelSpec) and info["spec"].cell == "notes-gru"
    assert not model.training
    # The loaded model computes what it was trained to: same numbers as its own validation.
    assert task.evaluate(model, torch.device("cpu"))["val_loss"] == pytest.approx(
        info["metrics"]["val_loss"], rel=1e-5
    )


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    run_training(replace(TINY_CHAR, epochs=1), tmp_path / "run", progress=False, log=lambda _: None)
    other = replace(make_task("char", TINY_CHAR.options).spec("notes-lstm", 16, 1), hidden_size=16)
    with pytest.raises(CheckpointError, match=r"another architecture.*cell 'notes-gru'"):
        load_checkpoint(tmp_path / "run" / "checkpoint.pt", expect=other)


def test_forecast_speaks_ppm() -> None:
    config = TrainConfig(
        task="forecast",
        cell="gru",
        hidden=8,
        epochs=1,
        options=TaskOptions(batch_size=8, bptt=52, steps_per_epoch=3),
    )
    task = make_task("forecast", config.options)
    model, history = fit(task, config, device=torch.device("cpu"))
    metrics = history[-1].metrics
    assert metrics["naive_rmse"] == pytest.approx(0.513, abs=0.001)
    assert metrics["val_rmse"] > 0
    x = torch.tensor([[[330.0]]])
    y, _ = model(x)
    assert model.input_scaling is not None and model.input_scaling.mean[0] == pytest.approx(
        task.input_scaling.mean[0] if task.input_scaling else math.nan
    )
    assert y.shape == (1, 1, 1)


def test_adding_task_metrics() -> None:
    config = TrainConfig(
        task="adding",
        cell="rnn",
        hidden=8,
        epochs=1,
        options=TaskOptions(batch_size=8, steps_per_epoch=2, length=6, valid_size=32),
    )
    _, history = fit(make_task("adding", config.options), config, device=torch.device("cpu"))
    assert set(history[-1].metrics) == {"val_mse", "val_accuracy"}
    assert 0.0 <= history[-1].metrics["val_accuracy"] <= 1.0


def test_export_run_writes_and_replaces_a_version(tmp_path: Path) -> None:
    config = replace(TINY_CHAR, epochs=1)
    run_training(config, tmp_path / "run", progress=False, log=lambda _: None)
    first = export_run(tmp_path / "run", tmp_path / "models", "char-tiny")
    manifest = load_manifest(tmp_path / "models" / "char-tiny" / "1")
    assert manifest.vocabulary == make_task("char", config.options).vocabulary
    assert manifest.metrics["epoch"] == 1 and "val_bpc" in manifest.metrics
    assert manifest.parity["max_abs_diff"] <= 1e-5
    second = export_run(tmp_path / "run", tmp_path / "models", "char-tiny")
    assert second.sha256 == first.sha256
    leftovers = [p.name for p in (tmp_path / "models").iterdir()]
    assert leftovers == ["char-tiny"]


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rnnserve train: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--cell", "transformer"], "unknown cell kind 'transformer'"),
        (["--hidden", "0"], "--hidden must be at least 1"),
        (["--lstm-output", "sigmoid"], "--lstm-output"),
        (["--corpus", "/nonexistent/kjv.txt"], "does not exist"),
        (["--bptt", "5000"], "too few"),
        (["--dropout", "1"], "--dropout must be at least 0 and below 1"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    out = tmp_path / "run"
    code = main([*CHAR_ARGS, "--out", str(out), *extra])
    assert code == 2
    one_line_error(capsys, needle.replace("too few", "needs at least"))
    assert not out.exists()


def test_cli_empty_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main([*CHAR_ARGS, "--corpus", str(empty), "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "is empty")
    assert not (tmp_path / "r").exists()


def test_cli_unknown_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "poetry", "--quiet"]) == 2
    one_line_error(capsys, "unknown task 'poetry'")


def test_cli_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main([*CHAR_ARGS, "--out", str(blocker / "run")]) == 2
    one_line_error(capsys, "writable --out")


def test_cli_resume_and_existing_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "run")
    assert main([*CHAR_ARGS, "--out", out, "--resume"]) == 2
    one_line_error(capsys, "does not exist")
    assert main([*CHAR_ARGS, "--out", out]) == 0
    capsys.readouterr()
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert main([*CHAR_ARGS, "--out", out]) == 2
    one_line_error(capsys, "already holds a run", "--resume")
    assert main([*CHAR_ARGS, "--out", out, "--resume", "--cell", "notes-lstm"]) == 2
    one_line_error(capsys, "another architecture")
    assert main([*CHAR_ARGS, "--out", out, "--resume", "--lr", "0.1"]) == 2
    one_line_error(capsys, "other settings", "lr")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert main([*CHAR_ARGS, "--out", out, "--resume", "--epochs", "2"]) == 0
    summary = capsys.readouterr().out
    assert "best epoch" in summary and "resuming after epoch 1" in summary


def test_cli_experiment_flag_needs_adding(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "char", "--experiment", "--quiet"]) == 2
    one_line_error(capsys, "--experiment goes with the adding task")


def test_cli_all_rejects_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "all",
            "--out",
            str(tmp_path / "runs"),
            "--models",
            str(tmp_path / "models"),
            "--only",
            "char-transformer",
            "--quiet",
        ]
    )
    assert code == 2
    one_line_error(capsys, "unknown shipped model(s) char-transformer")
    assert not (tmp_path / "models").exists()


def test_real_process_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve.client.cli",
            "train",
            "char",
            "--cell",
            "nope",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "rnnserve train: unknown cell kind 'nope'; choose one of rnn, notes-mingru, notes-gru, "
        "notes-lstm, gru, lstm"
    ]


def test_numpy_streams_are_per_epoch() -> None:
    # Batches of epoch e depend on (seed, e) only: the basis of exact resumption.
    task = make_task("adding", TaskOptions(batch_size=2, steps_per_epoch=2, length=4))
    cpu = torch.device("cpu")
    a = [x for x, _, _ in task.batches(np.random.default_rng([0, 2]), cpu)]
    b = [x for x, _, _ in task.batches(np.random.default_rng([0, 2]), cpu)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_warmup_scales_the_first_batches_and_survives_a_resume(tmp_path: Path) -> None:
    config = replace(TINY_CHAR, warmup=5)
    assert [warmup_factor(config, i) for i in (0, 1, 4, 5, 100)] == [0.2, 0.4, 1.0, 1.0, 1.0]
    assert warmup_factor(TINY_CHAR, 0) == 1.0
    # A warm-up longer than the first epoch: the resumed run must count the batches before it.
    per_epoch = len(list(make_task("char", config.options).batches(np.random.default_rng(0), cpu)))
    config = replace(config, warmup=per_epoch + 3)
    whole = run_training(config, tmp_path / "whole", progress=False, log=lambda _: None)
    run_training(replace(config, epochs=1), tmp_path / "split", progress=False, log=lambda _: None)
    resumed = run_training(
        config, tmp_path / "split", resume=True, progress=False, log=lambda _: None
    )
    assert resumed.history[-1].metrics == whole.history[-1].metrics
    plain, _ = fit(make_task("char", TINY_CHAR.options), TINY_CHAR, device=cpu)
    warm, _ = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    assert not same_weights(weights(plain), weights(warm))


def test_forget_bias_sets_every_lstm_and_nothing_else() -> None:
    task = make_task("char", TINY_CHAR.options)
    for cell in ("notes-lstm", "lstm"):
        _, model = new_model(task, replace(TINY_CHAR, cell=cell, forget_bias=-0.5))
        _, default = new_model(task, replace(TINY_CHAR, cell=cell))
        h = TINY_CHAR.hidden
        if cell == "notes-lstm":
            bias = model.rnn.cells[0].bias  # gates u, f, o, c
            forget, other = bias[h : 2 * h], bias[:h]
        else:
            # nn.LSTM: i, f, g, o; the gate sees bias_ih + bias_hh
            bias = model.rnn.bias_ih_l0 + model.rnn.bias_hh_l0
            forget, other = bias[h : 2 * h], bias[:h]
        assert torch.all(forget == -0.5)
        assert not torch.all(other == -0.5)
        changed = {k for k, v in weights(model).items() if not torch.equal(v, weights(default)[k])}
        assert changed <= {"rnn.cells.0.bias", "rnn.bias_ih_l0", "rnn.bias_hh_l0"}
    _, gru = new_model(task, replace(TINY_CHAR, forget_bias=-0.5))
    _, gru_default = new_model(task, TINY_CHAR)
    assert same_weights(weights(gru), weights(gru_default))


def test_cli_notes_lstm_defaults_to_the_notes_output_with_safe_settings() -> None:
    from rnnserve.export.cli_train import NOTES_LSTM_DEFAULTS, build_config, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    notes = build_config(parser.parse_args(["char", "--cell", "notes-lstm"]))
    assert notes.lstm_output == "notes"
    assert (notes.optimizer, notes.lr, notes.clip) == ("sgd", 1.0, NOTES_LSTM_DEFAULTS["clip"])
    tanh = build_config(
        parser.parse_args(["char", "--cell", "notes-lstm", "--lstm-output", "tanh"])
    )
    assert (tanh.lstm_output, tanh.optimizer, tanh.lr, tanh.clip) == ("tanh", "adam", 3e-3, 1.0)
    chosen = build_config(
        parser.parse_args(["char", "--cell", "notes-lstm", "--optimizer", "adam", "--lr", "5e-4"])
    )
    assert (chosen.optimizer, chosen.lr) == ("adam", 5e-4)
    gru = build_config(parser.parse_args(["char", "--cell", "gru", "--warmup", "7"]))
    assert (gru.optimizer, gru.lr, gru.warmup) == ("adam", 3e-3, 7)


def test_residual_forecaster_starts_near_the_naive_forecast() -> None:
    config = TrainConfig(
        task="forecast",
        cell="gru",
        hidden=8,
        epochs=1,
        options=TaskOptions(batch_size=8, bptt=52, steps_per_epoch=1, residual=True),
    )
    task = make_task("forecast", config.options)
    spec, model = new_model(task, config)
    train = task.series.train.astype(np.float64)  # type: ignore[attr-defined]
    assert spec.residual == pytest.approx(np.sqrt(np.mean(np.diff(train) ** 2)))
    assert 0.3 < spec.residual < 1.0  # ppm: a week's typical change, not the level's spread
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        x = torch.tensor([[[350.0]], [[351.5]]])
        y, _ = model(x)
    assert torch.equal(y, x)  # a zero head forecasts "next week = this week" exactly


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--residual"], "--residual goes with the forecast task"),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
        (["--optimizer", "lbfgs"], "--optimizer must be adam or sgd"),
    ],
)
def test_cli_refuses_misplaced_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    assert main([*CHAR_ARGS, "--out", str(tmp_path / "r"), *extra]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "r").exists()


def test_activation_penalty_keeps_the_activation_small() -> None:
    config = replace(TINY_CHAR, cell="notes-lstm", lstm_output="notes", epochs=1, lr=3e-2)
    task = make_task("char", config.options)
    ids = torch.from_numpy(task.corpus.valid[:200].copy())[:, None]  # type: ignore[attr-defined]

    def activation_size(model: torch.nn.Module) -> float:
        with torch.no_grad():
            _, (a, _) = model(ids)
        return float(a.pow(2).mean())

    plain, history = fit(task, config, device=cpu)
    held, held_history = fit(task, replace(config, activation_penalty=1.0), device=cpu)
    assert activation_size(held) < 0.5 * activation_size(plain)
    # the reported training loss is the task's alone, without the penalty
    assert held_history[0].step_losses[0] == pytest.approx(history[0].step_losses[0])
    assert not held.head._forward_hooks  # the hook that reads the activation is gone
