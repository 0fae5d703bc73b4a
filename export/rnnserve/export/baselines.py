"""Baselines a user judges the shipped models against, on the very split they are validated on.

- ``ngram_bpc``: a count-based character n-gram model (interpolated Kneser-Ney), scored in bits
  per character on the char task's validation text; ``char_baselines`` picks its order on a
  held-out tail of the *training* text, so the validation text chooses nothing.
- ``forecast_baselines``: for the CO2 forecasters, the naive forecast (next week = this week),
  the seasonal-naive forecast (next week = the same week a year earlier), the seasonal naive
  plus the last year's change (drift), a linear autoregression on the last 53 weeks, and a
  seasonal ARIMA fitted by statsmodels on the training weeks; each one step ahead, from the true
  values before the week forecast, on the validation weeks the recurrent models are scored on.

``rnnserve train baselines`` prints them (cli_train.py); docs/training.md quotes them.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from rnnserve.export.datasets import CharCorpus, Series

#: weeks in a year of the weekly CO2 record (365.25 / 7 = 52.18, rounded)
SEASON = 52
#: The seasonal ARIMA: Box and Jenkins' "airline" model (0, 1, 1) x (0, 1, 1, SEASON), the
#: classic model of a trending seasonal series such as this one. Larger orders were not tried:
#: one fit at a 52-week season takes statsmodels about 25 CPU-seconds here.
SARIMA_ORDER = (0, 1, 1)
SARIMA_SEASONAL = (0, 1, 1, SEASON)
#: where the optimiser starts (MA, seasonal MA, noise variance), instead of statsmodels' own
#: start-parameter search, which at a 52-week season took over ten CPU-minutes here
SARIMA_START = (-0.3, -0.8, 0.1)


@dataclass(frozen=True)
class NgramCounts:
    """Kneser-Ney statistics of one order ``n``, each keyed by an n-gram's integer code.

    ``codes`` (sorted) are the n-grams seen, ``counts`` their counts (raw counts at the top
    order, continuation counts below it); ``contexts`` (sorted) the (n-1)-gram contexts seen,
    ``totals`` the sum of their n-grams' counts and ``types`` how many distinct next characters
    follow them; ``discount`` the absolute discount of this order.
    """

    codes: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    totals: np.ndarray
    types: np.ndarray
    discount: float


def _codes(ids: np.ndarray, n: int, vocab: int) -> np.ndarray:
    """The integer code of every n-gram of ``ids`` (base ``vocab``), one per end position."""
    code = np.zeros(ids.size - n + 1, dtype=np.int64)
    for k in range(n):
        code = code * vocab + ids[k : ids.size - n + 1 + k]
    return code


def _order_counts(ids: np.ndarray, n: int, top: int, vocab: int) -> NgramCounts:
    codes, raw = np.unique(_codes(ids, n, vocab), return_counts=True)
    if n < top:
        # Continuation count: how many distinct characters precede the n-gram in the text.
        longer = np.unique(_codes(ids, n + 1, vocab)) % (vocab**n)
        codes, raw = np.unique(longer, return_counts=True)
    n1, n2 = int(np.sum(raw == 1)), int(np.sum(raw == 2))
    discount = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5
    contexts, inverse = np.unique(codes // vocab, return_inverse=True)
    totals = np.bincount(inverse, weights=raw).astype(np.float64)
    types = np.bincount(inverse).astype(np.float64)
    return NgramCounts(codes, raw.astype(np.float64), contexts, totals, types, discount)


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``values`` at ``query`` in the sorted ``keys``; 0 where a query is not among them."""
    if keys.size == 0:
        return np.zeros(query.size)
    at = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return np.where(keys[at] == query, values[at], 0.0)


def ngram_probabilities(
    train: np.ndarray, context: np.ndarray, text: np.ndarray, order: int, vocab: int
) -> np.ndarray:
    """The probability an order-``order`` interpolated Kneser-Ney model trained on ``train``
    gives each character of ``text``, each read after the characters before it; the first ones
    read their context from the end of ``context`` (at least ``order - 1`` characters).

    The lowest order interpolates with the uniform distribution over ``vocab``, so no
    character gets zero mass, and every context's probabilities sum to 1.
    """
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    if vocab**order >= 2**62:
        raise ValueError(f"order {order} over {vocab} symbols overflows the n-gram codes")
    if train.size <= order or context.size < order - 1:
        raise ValueError(f"too short a text for order {order}")
    text = np.concatenate([context[context.size - (order - 1) :], text])
    prob = np.full(text.size - (order - 1), 1.0 / vocab)
    for n in range(1, order + 1):
        stats = _order_counts(train, n, order, vocab)
        grams = _codes(text[order - n :], n, vocab)
        history = grams // vocab
        count = _lookup(stats.codes, stats.counts, grams)
        total = _lookup(stats.contexts, stats.totals, history)
        types = _lookup(stats.contexts, stats.types, history)
        seen = total > 0
        d = stats.discount
        safe = np.where(seen, total, 1.0)
        mixed = np.maximum(count - d, 0.0) / safe + d * types / safe * prob
        prob = np.where(seen, mixed, prob)
    return prob


def ngram_bpc(train: np.ndarray, valid: np.ndarray, order: int, vocab: int) -> float:
    """Bits per character of an order-``order`` Kneser-Ney model on ``valid``, the text that
    follows ``train`` (the first characters of ``valid`` read their context from its end)."""
    return float(-np.mean(np.log2(ngram_probabilities(train, train, valid, order, vocab))))


def char_baselines(corpus: CharCorpus, orders: range = range(1, 11)) -> dict[str, Any]:
    """The n-gram baseline of the char task: every order's validation bits per character, and
    the order a held-out tenth of the training text picks (trained on the other nine tenths)."""
    vocab = len(corpus.vocabulary)
    cut = int(corpus.train.size * 0.9)
    held_out = {n: ngram_bpc(corpus.train[:cut], corpus.train[cut:], n, vocab) for n in orders}
    chosen = min(held_out, key=lambda n: held_out[n])
    valid = {n: ngram_bpc(corpus.train, corpus.valid, n, vocab) for n in orders}
    return {
        "uniform_bpc": math.log2(vocab),
        "held_out_bpc": held_out,
        "valid_bpc": valid,
        "chosen_order": chosen,
        "ngram_bpc": valid[chosen],
    }


def _rmse(forecast: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((forecast - truth) ** 2)))


def _mae(forecast: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.abs(forecast - truth)))


def autoregression(values: np.ndarray, split: int, lags: int = 53) -> np.ndarray:
    """One-step forecasts of ``values[split:]`` by a least-squares AR(``lags``) with intercept
    on the differences, fitted on the training weeks ``values[:split]`` only."""
    diffs = np.diff(values)

    def design(end: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.stack([diffs[t - lags : t][::-1] for t in range(lags, end)])
        return np.hstack([np.ones((rows.shape[0], 1)), rows]), diffs[lags:end]

    x, y = design(split - 1)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    # forecast of values[t] = values[t-1] + predicted diffs[t-1], for t = split .. end
    rows = np.stack([diffs[t - lags : t][::-1] for t in range(split - 1, diffs.size)])
    pred = np.hstack([np.ones((rows.shape[0], 1)), rows]) @ coef
    forecast: np.ndarray = values[split - 1 : -1] + pred
    return forecast


def sarima(values: np.ndarray, split: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One-step forecasts of ``values[split:]`` by the seasonal ARIMA ``SARIMA_ORDER`` x
    ``SARIMA_SEASONAL``, its parameters fitted (maximum likelihood) on the training weeks only
    and then held fixed while the filter runs on over the validation weeks."""
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    def model(data: np.ndarray) -> Any:
        # Differencing before the state space model keeps its state at 54 entries, not 107.
        return SARIMAX(
            data, order=SARIMA_ORDER, seasonal_order=SARIMA_SEASONAL, simple_differencing=True
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = model(values[:split]).fit(start_params=SARIMA_START, disp=False, maxiter=100)
        whole = model(values).filter(fitted.params)
    # The model sees y<t> = (1 - B)(1 - B^52) v<t>, from week 53 on; undo the differencing:
    # v<t> = y<t> + v<t-1> + v<t-52> - v<t-53>, each forecast using only earlier weeks.
    lag = 1 + SEASON
    diffs = np.asarray(whole.get_prediction(start=split - lag).predicted_mean)
    forecast = (
        diffs
        + values[split - 1 : -1]
        + values[split - SEASON : -SEASON]
        - values[split - lag : -lag]
    )
    about = {
        "order": f"{SARIMA_ORDER}x{SARIMA_SEASONAL}",
        "params": {
            k: round(float(v), 4) for k, v in zip(fitted.param_names, fitted.params, strict=True)
        },
        "aic": float(fitted.aic),
    }
    return forecast, about


def forecast_baselines(series: Series, *, with_sarima: bool = True) -> dict[str, Any]:
    """RMSE and MAE (ppm) of each baseline on the forecast task's validation weeks."""
    values = series.values.astype(np.float64)
    split = series.split
    truth = values[split:]
    forecasts: dict[str, np.ndarray] = {
        "naive": values[split - 1 : -1],
        "seasonal_naive": values[split - SEASON : -SEASON],
        # last year's same week, plus the change over the last year
        "seasonal_naive_drift": values[split - SEASON : -SEASON]
        + (values[split - 1 : -1] - values[split - 1 - SEASON : -1 - SEASON]),
        "ar53": autoregression(values, split),
    }
    about: dict[str, Any] = {}
    if with_sarima:
        t0 = time.perf_counter()
        forecasts["sarima"], about = sarima(values, split)
        about["seconds"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        name: {"rmse": _rmse(f, truth), "mae": _mae(f, truth)} for name, f in forecasts.items()
    }
    if about:
        result["sarima"].update(about)
    return result
