"""The data sets load offline, are non-empty, split in time, and fail with a clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rnnserve.export.datasets import (
    DEFAULT_CORPUS,
    DataError,
    adding_batch,
    load_char_corpus,
    load_co2,
)


def test_shipped_corpus_is_the_kjv_slice() -> None:
    corpus = load_char_corpus()
    text = DEFAULT_CORPUS.read_text(encoding="utf-8")
    assert text.startswith("In the beginning God created the heaven and the earth.")
    assert 300_000 < len(text) < 800_000
    assert corpus.vocabulary == sorted(set(text))
    # Validation is the end of the text, training the start: together the whole text, in order.
    assert corpus.decode(np.concatenate([corpus.train, corpus.valid])) == text
    assert corpus.valid.size == pytest.approx(0.1 * len(text), abs=1)
    assert corpus.train.dtype == np.int64
    assert corpus.facts["licence"] == "public domain"


def test_encode_decode_round_trip() -> None:
    corpus = load_char_corpus(limit=5000)
    ids = corpus.encode("And God said")
    assert corpus.decode(ids) == "And God said"
    assert int(ids.max()) < len(corpus.vocabulary)


def test_a_custom_corpus_and_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abcab" * 100)
    corpus = load_char_corpus(path, limit=100)
    assert corpus.vocabulary == ["a", "b", "c"]
    assert corpus.train.size + corpus.valid.size == 100
    assert corpus.facts["source"] == str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("", "is empty"), ("   \n", "is empty"), ("ab", "too few")],
)
def test_bad_corpus_says_what_is_wrong(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_char_corpus(path)


def test_undecodable_corpus(tmp_path: Path) -> None:
    path = tmp_path / "bin.txt"
    path.write_bytes(b"\xff\xfe\x00garbage" * 10)
    with pytest.raises(DataError, match="UTF-8"):
        load_char_corpus(path)


def test_co2_series_is_complete_and_split_in_time() -> None:
    series = load_co2()
    assert series.values.shape == (2284,)
    assert np.isfinite(series.values).all()
    assert series.facts["interpolated_weeks"] == 59
    assert 300 < series.values.min() < series.values.max() < 400
    # The validation weeks come after every training week.
    assert series.dates[series.split - 1] < series.dates[series.split]
    assert series.split == pytest.approx(0.8 * 2284, abs=1)
    assert series.mean == pytest.approx(float(series.train.mean()), rel=1e-6)
    assert series.std > 0


def test_adding_batch_shapes_and_targets() -> None:
    x, y = adding_batch(20, 64, np.random.default_rng(3))
    assert x.shape == (20, 64, 2) and y.shape == (64,)
    assert x.dtype == np.float32 and y.dtype == np.float32
    markers = x[:, :, 1]
    assert (markers.sum(axis=0) == 2).all()
    # One marker in each half of the sequence.
    assert (markers[:10].sum(axis=0) == 1).all() and (markers[10:].sum(axis=0) == 1).all()
    np.testing.assert_allclose(y, (x[:, :, 0] * markers).sum(axis=0), rtol=1e-6)
    assert ((x[:, :, 0] >= 0) & (x[:, :, 0] < 1)).all()


def test_adding_batch_is_fixed_by_its_seed() -> None:
    a = adding_batch(10, 8, np.random.default_rng(7))
    b = adding_batch(10, 8, np.random.default_rng(7))
    c = adding_batch(10, 8, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_adding_batch_rejects_impossible_sizes() -> None:
    with pytest.raises(DataError, match="length >= 2"):
        adding_batch(1, 4, np.random.default_rng(0))
