"""The data sets rnnserve trains on: real data, all of it available offline.

- ``load_char_corpus``: a character-level corpus, by default the books of Genesis and Exodus from
  the King James Bible (public domain), committed under ``data/`` (docs/data.md says how it was
  extracted from Debian's ``bible-kjv-text``).
- ``load_co2``: NOAA's weekly Mauna Loa CO2 record, 1958-2001, as shipped with statsmodels
  (public domain, US Government work); its 59 missing weeks are filled by linear interpolation.
- ``adding_batch``: the adding problem of Hochreiter & Schmidhuber (1997), generated from a seed.

Every split is chronological: validation is the later part of a text or series, never a random
sample of it, so no future value leaks into training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CORPUS = DATA_DIR / "kjv-genesis-exodus.txt"
KJV_FACTS: dict[str, Any] = {
    "name": "kjv-genesis-exodus",
    "source": "King James Bible (1611), Genesis and Exodus, from Debian's bible-kjv-text 4.38",
    "licence": "public domain",
}
CO2_FACTS: dict[str, Any] = {
    "name": "mauna-loa-co2-weekly",
    "source": "NOAA Mauna Loa CO2, weekly 1958-03-29..2001-12-29, via statsmodels.datasets.co2",
    "licence": "public domain (US Government work)",
    "units": "ppm",
}


class DataError(ValueError):
    """A data set is missing, empty or unusable; the message says how to fix it."""


@dataclass(frozen=True)
class CharCorpus:
    """A text as token ids over its own character vocabulary.

    ``vocabulary[i]`` is the character of token id ``i``; it is the sorted set of the text's
    characters, so the same text always gives the same ids. ``train`` is the first part of the
    text and ``valid`` the rest (int64 ids).
    """

    vocabulary: list[str]
    train: np.ndarray
    valid: np.ndarray
    facts: dict[str, Any] = field(default_factory=dict)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``; KeyError names a character outside the vocabulary."""
        index = {ch: i for i, ch in enumerate(self.vocabulary)}
        return np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text))

    def decode(self, ids: np.ndarray) -> str:
        return "".join(self.vocabulary[int(i)] for i in ids)


def load_char_corpus(
    path: Path | None = None,
    *,
    valid_fraction: float = 0.1,
    limit: int | None = None,
) -> CharCorpus:
    """Read a UTF-8 text file and split it: the first ``1 - valid_fraction`` trains.

    ``limit`` keeps only the first ``limit`` characters (for tests and quick runs). Raises
    DataError when the file is missing, unreadable, empty or too short to split.
    """
    path = DEFAULT_CORPUS if path is None else Path(path)
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be between 0 and 1, got {valid_fraction}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"corpus {path} does not exist; pass --corpus with a UTF-8 text file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read corpus {path} ({exc}); pass a UTF-8 text file") from None
    if limit is not None:
        text = text[:limit]
    if not text.strip():
        raise DataError(f"corpus {path} is empty; pass --corpus with a non-empty text file")
    cut = int(len(text) * (1.0 - valid_fraction))
    if cut < 2 or len(text) - cut < 2:
        raise DataError(
            f"corpus {path} has only {len(text)} characters, too few to split into "
            "training and validation; use a longer text"
        )
    vocabulary = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocabulary)}
    ids = np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text))
    facts: dict[str, Any] = (
        dict(KJV_FACTS) if path == DEFAULT_CORPUS else {"name": path.stem, "source": str(path)}
    )
    facts.update(
        characters=len(text),
        vocabulary_size=len(vocabulary),
        train_characters=cut,
        valid_characters=len(text) - cut,
        split=f"first {1.0 - valid_fraction:.0%} trains, the rest validates",
    )
    return CharCorpus(vocabulary=vocabulary, train=ids[:cut], valid=ids[cut:], facts=facts)


@dataclass(frozen=True)
class Series:
    """A univariate series in its own units, split in time at ``split``.

    ``values[:split]`` trains; a forecaster is validated on the targets ``values[split:]``
    (each predicted from the true values before it: one-step-ahead forecasting).
    ``mean`` / ``std`` are the scaling the model is trained in, taken from the training part.
    """

    values: np.ndarray
    dates: list[str]
    split: int
    mean: float
    std: float
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> np.ndarray:
        return self.values[: self.split]


def load_co2(*, valid_fraction: float = 0.2, headroom: float = 2.0) -> Series:
    """The weekly Mauna Loa CO2 record in ppm, gaps filled by linear interpolation.

    Validation is the last ``valid_fraction`` of the weeks. The CO2 level rises year on year, so
    validation values lie above every training value; ``std`` is the training part's standard
    deviation times ``headroom``, which keeps the later, higher values inside the range where a
    tanh cell is near-linear instead of saturated.
    """
    try:
        from statsmodels.datasets import co2
    except ModuleNotFoundError:
        raise DataError(
            "the CO2 series comes with statsmodels; install it with: pip install 'rnnserve[train]'"
        ) from None
    frame = co2.load_pandas().data
    filled = frame["co2"].interpolate(method="linear", limit_direction="both")
    values = filled.to_numpy(dtype=np.float64)
    if values.size < 10 or not np.isfinite(values).all():
        raise DataError("the statsmodels CO2 series is empty or broken; reinstall statsmodels")
    split = round(values.size * (1.0 - valid_fraction))
    train = values[:split]
    mean = float(train.mean())
    std = float(train.std() * headroom)
    dates = [d.strftime("%Y-%m-%d") for d in frame.index]
    facts = dict(CO2_FACTS)
    facts.update(
        weeks=int(values.size),
        interpolated_weeks=int(frame["co2"].isna().sum()),
        train_weeks=split,
        valid_weeks=int(values.size - split),
        split=f"train {dates[0]}..{dates[split - 1]}, validate {dates[split]}..{dates[-1]}",
    )
    return Series(
        values=values.astype(np.float32), dates=dates, split=split, mean=mean, std=std, facts=facts
    )


def adding_batch(
    length: int, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the adding problem, time-major.

    Returns ``x`` float32 ``[length, batch, 2]`` and ``y`` float32 ``[batch]``. Channel 0 holds
    numbers drawn uniformly from [0, 1); channel 1 marks exactly two steps with 1: one in the
    first half of the sequence and one in the second. The target is the sum of the two marked
    numbers, to be read out at the last step, so the first number must be remembered for
    between ``length / 2`` and ``length`` steps. Predicting the mean (1.0) scores an MSE of
    1/6 ≈ 0.167; that is the bar a model must clear to have learned anything.
    """
    if length < 2 or batch < 1:
        raise DataError(
            f"the adding problem needs length >= 2 and batch >= 1, got {length}, {batch}"
        )
    half = length // 2
    x = np.zeros((length, batch, 2), dtype=np.float32)
    x[:, :, 0] = rng.random((length, batch), dtype=np.float32)
    cols = np.arange(batch)
    first = rng.integers(0, half, size=batch)
    second = rng.integers(half, length, size=batch)
    x[first, cols, 1] = 1.0
    x[second, cols, 1] = 1.0
    y = x[first, cols, 0] + x[second, cols, 0]
    return x, y.astype(np.float32)
