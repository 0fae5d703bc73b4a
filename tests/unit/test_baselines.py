"""The baselines the shipped models are judged against: the n-gram and the forecasts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rnnserve.client.cli import main
from rnnserve.export.baselines import (
    SEASON,
    autoregression,
    char_baselines,
    forecast_baselines,
    ngram_bpc,
    ngram_probabilities,
)
from rnnserve.export.datasets import CharCorpus, Series


def _text(n: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int64)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_every_context_s_probabilities_sum_to_one(order):
    vocab = 7
    # a skewed text, so that counts, discounts and unseen contexts all differ
    rng = np.random.default_rng(1)
    train = rng.choice(vocab, 3000, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05, 0.0]).astype(np.int64)
    for seed in range(6):
        context = _text(max(order - 1, 1), vocab, seed)
        context[0] = 6 if seed % 2 else context[0]  # sometimes a context never seen in training
        probs = [
            ngram_probabilities(train, context, np.array([w]), order, vocab)[0]
            for w in range(vocab)
        ]
        assert min(probs) > 0
        assert sum(probs) == pytest.approx(1.0, abs=1e-9)


def test_longer_context_wins_on_a_predictable_text_and_loses_nothing_on_noise():
    vocab = 5
    cycle = np.tile(np.array([0, 1, 2, 3, 4, 0, 2, 4, 1, 3]), 400).astype(np.int64)
    train, valid = cycle[:3000], cycle[3000:]
    assert ngram_bpc(train, valid, 1, vocab) == pytest.approx(math.log2(vocab), abs=0.01)
    assert ngram_bpc(train, valid, 3, vocab) < 0.2
    noise = _text(20000, vocab, 3)
    # on uniform noise no order can beat log2(vocab) by much, and the smoothing costs little
    for order in (1, 2, 3):
        assert ngram_bpc(noise[:18000], noise[18000:], order, vocab) == pytest.approx(
            math.log2(vocab), abs=0.1
        )


def test_char_baselines_choose_the_order_on_the_training_text_alone():
    vocab = ["a", "b", "c", "d"]
    ids = np.tile(np.array([0, 1, 2, 3, 3, 2, 1, 0, 1, 3]), 300).astype(np.int64)
    corpus = CharCorpus(vocabulary=vocab, train=ids[:2700], valid=_text(300, 4, 5))
    result = char_baselines(corpus, orders=range(1, 5))
    assert result["chosen_order"] >= 3  # the training text is a cycle of 10
    assert result["ngram_bpc"] == result["valid_bpc"][result["chosen_order"]]
    assert result["uniform_bpc"] == 2.0


def test_ngram_refuses_bad_orders():
    with pytest.raises(ValueError, match="order must be at least 1"):
        ngram_bpc(_text(100, 4, 0), _text(10, 4, 1), 0, 4)
    with pytest.raises(ValueError, match="overflows"):
        ngram_bpc(_text(100, 62, 0), _text(10, 62, 1), 11, 62)


def _series(values: np.ndarray, split: int) -> Series:
    return Series(
        values=values.astype(np.float32),
        dates=[""] * values.size,
        split=split,
        mean=0.0,
        std=1.0,
    )


def test_forecast_baselines_are_exact_where_the_series_is_their_model():
    t = np.arange(600, dtype=np.float64)
    seasonal = np.sin(2 * np.pi * t / SEASON)
    # a pure 52-week cycle: the seasonal naive forecast is exact, the naive one is not
    periodic = forecast_baselines(_series(300 + seasonal, 500), with_sarima=False)
    assert periodic["seasonal_naive"]["rmse"] < 1e-4
    assert periodic["naive"]["rmse"] > 0.05
    # cycle plus a linear trend: the seasonal naive with drift is exact, plain seasonal is not
    trend = forecast_baselines(_series(300 + 0.03 * t + seasonal, 500), with_sarima=False)
    assert trend["seasonal_naive_drift"]["rmse"] < 1e-4
    assert trend["seasonal_naive"]["rmse"] == pytest.approx(0.03 * SEASON, rel=1e-3)
    values = 300 + 0.03 * t + seasonal
    naive = trend["naive"]["rmse"]
    assert naive == pytest.approx(np.sqrt(np.mean(np.diff(values)[499:] ** 2)), rel=1e-4)


def test_autoregression_reads_only_earlier_weeks():
    rng = np.random.default_rng(0)
    values = np.cumsum(rng.normal(size=400))
    first = autoregression(values, 300, lags=5)
    changed = values.copy()
    changed[350:] += 100.0  # the future moves; forecasts up to week 350 must not
    second = autoregression(changed, 300, lags=5)
    assert first.shape == (100,)
    np.testing.assert_allclose(first[:51], second[:51])
    assert not np.allclose(first[51:], second[51:])


def test_cli_prints_the_char_baselines(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "char", "--baselines", "--corpus-limit", "20000"]
    assert main([*args, "--batch-size", "8", "--bptt", "20"]) == 0
    out = capsys.readouterr().out
    assert "chosen on the held-out tail" in out
    assert "uniform over" in out


def test_cli_refuses_baselines_of_the_adding_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "adding", "--baselines"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rnnserve train: --baselines goes with the char or forecast task"]
