"""The shipped char-gru-ensemble, run by ONNX Runtime, beats the n-gram baseline on the same split.

docs/training.md ("Baselines") states it: the exported graph's bits per character on the char
task's validation text, scored exactly as ``CharTask.evaluate`` scores the PyTorch model (16
contiguous streams, the state carried from one chunk to the next), is the manifest's figure and
lies below the interpolated Kneser-Ney 9-gram's (the order ``char_baselines`` picks).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rnnserve.export.baselines import ngram_bpc
from rnnserve.export.datasets import load_char_corpus
from rnnserve.manifest import MODEL_FILE, Manifest, load_manifest

ENSEMBLE = Path(__file__).resolve().parents[2] / "models" / "char-gru-ensemble" / "1"
#: the order ``char_baselines`` picks on the held-out tail of the training text
NGRAM_ORDER = 9


def onnx_valid_bpc(folder: Path, valid: np.ndarray) -> float:
    """Bits per character of the ONNX model in ``folder`` on ``valid``, laid out as
    ``CharTask.evaluate`` lays it out: up to 16 streams, chunks of 256 steps, zero start state."""
    manifest: Manifest = load_manifest(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a shared machine: one thread is plenty for 16 streams
    session = ort.InferenceSession(
        str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"]
    )
    streams = max(1, min(16, (valid.size - 1) // 64))
    per_stream = (valid.size - 1) // streams
    data = valid[: per_stream * streams + 1]
    x_all = data[:-1].reshape(streams, per_stream).T
    y_all = data[1:].reshape(streams, per_stream).T
    states = {
        s.input: np.zeros([*s.shape[: s.batch_axis], streams, *s.shape[s.batch_axis :]], np.float32)
        for s in manifest.states
    }
    total, count = 0.0, 0
    for start in range(0, per_stream, 256):
        x, y = x_all[start : start + 256], y_all[start : start + 256]
        feeds: dict[str, np.ndarray] = {manifest.input_name: np.ascontiguousarray(x), **states}
        if manifest.sequence_lens:
            feeds[manifest.sequence_lens] = np.full(streams, x.shape[0], np.int32)
        names = [manifest.output_name, *(s.output for s in manifest.states)]
        logits, *new_states = session.run(names, feeds)
        states = {s.input: v for s, v in zip(manifest.states, new_states, strict=True)}
        z = logits.astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        total -= float(np.take_along_axis(log_p, y[..., None], axis=-1).sum())
        count += y.size
    return total / count / math.log(2.0)


def test_char_gru_ensemble_beats_the_ngram_on_the_validation_split() -> None:
    manifest = load_manifest(ENSEMBLE)
    corpus = load_char_corpus()
    assert manifest.vocabulary == corpus.vocabulary
    bpc = onnx_valid_bpc(ENSEMBLE, corpus.valid)
    assert abs(bpc - manifest.metrics["val_bpc"]) < 1e-3, (bpc, manifest.metrics)
    ngram = ngram_bpc(corpus.train, corpus.valid, NGRAM_ORDER, len(corpus.vocabulary))
    assert bpc < ngram, f"char-gru-ensemble {bpc:.3f} bits/char, the {NGRAM_ORDER}-gram {ngram:.3f}"
