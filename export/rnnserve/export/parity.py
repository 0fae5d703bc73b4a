"""Parity: the exported graph, run by ONNX Runtime, against the PyTorch model it came from.

The check an export must pass before anything is written. On random sequences (several batch
sizes and lengths, random initial states, random ``sequence_lens``), each sequence is fed both
whole and in chunks with the state carried from chunk to chunk, ONNX Runtime's state chain and
PyTorch's state chain each carried on their own, as a server would. Compared: every output step
inside a session's length and every final state.

Units: outputs are compared in the model's normalised units (the raw difference divided by the
output scaling's std, when there is one), because de-scaling to the data's units (a CO2 level of
about 350 ppm, say) makes one float32 rounding step alone worth 3e-5. States are compared as they
are. The raw difference in data units is reported too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from rnnserve.export.cells import State
from rnnserve.export.model import RecurrentModel
from rnnserve.export.onnx_graph import INPUT, OUTPUT, SEQUENCE_LENS, STATE_IO, ExportError

#: (batch, chunk lengths): one sequence each, fed whole and then chunk by chunk.
CASES: tuple[tuple[int, tuple[int, ...]], ...] = (
    (1, (1,)),
    (1, (6, 1, 9)),
    (3, (5, 1, 9)),
    (8, (16, 7)),
    (4, (3, 3, 3, 3)),
)
GOLDEN_STEPS = 16


@dataclass(frozen=True)
class ParityReport:
    """What the parity check measured; ``max_abs_diff`` is the figure held to ``tolerance``."""

    max_abs_diff: float
    output_max_abs_diff: float
    output_max_abs_diff_data_units: float
    state_max_abs_diff: float
    tolerance: float
    provider: str
    sequences: int
    steps: int
    units: str = "outputs in normalised units (diff / output std), states as they are"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reference(
    model: RecurrentModel, x: torch.Tensor, state: State, lens: torch.Tensor
) -> tuple[torch.Tensor, State]:
    """PyTorch with ``sequence_lens``: step by step, each session's state frozen past its length.

    ``x`` ``[T, B, ...]``, ``lens`` ``[B]``; returns ``(y [T, B, O], final state)``. Outputs past
    a session's length are whatever the step produced (callers ignore them).
    """
    ys = []
    for t in range(x.shape[0]):
        y, new = model.step(x[t], state)
        live = (t < lens).view(1, -1, 1)
        state = tuple(torch.where(live, n, o) for n, o in zip(new, state, strict=True))
        ys.append(y)
    return torch.stack(ys), state


def session(onnx_bytes: bytes, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    """An ONNX Runtime session on one provider, one thread (the check must not hog the CPU)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(onnx_bytes, opts, providers=[provider])
    except Exception as exc:  # ORT raises its own exception types for a graph it cannot load
        raise ExportError(f"ONNX Runtime cannot load the exported graph: {exc}") from exc


def run_graph(
    sess: ort.InferenceSession,
    model: RecurrentModel,
    x: np.ndarray,
    state: tuple[np.ndarray, ...],
    lens: np.ndarray,
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """One ONNX Runtime call with the graph's named inputs; returns ``(y, states)``."""
    names = model.spec.state_names
    feeds: dict[str, np.ndarray] = {INPUT: x, SEQUENCE_LENS: lens.astype(np.int32)}
    feeds.update({STATE_IO[s][0]: v for s, v in zip(names, state, strict=True)})
    outs = sess.run([OUTPUT, *(STATE_IO[s][1] for s in names)], feeds)
    return outs[0], tuple(outs[1:])


def random_inputs(
    model: RecurrentModel, rng: np.random.Generator, steps: int, batch: int
) -> np.ndarray:
    """Inputs in the data's own units: token ids, or features around the input scaling."""
    spec = model.spec
    if spec.input_kind == "tokens":
        return rng.integers(0, spec.input_size, size=(steps, batch), dtype=np.int64)
    x = rng.standard_normal((steps, batch, spec.input_size)).astype(np.float32)
    scaling = model.input_scaling
    if scaling is not None:
        x = x * np.asarray(scaling.std, np.float32) + np.asarray(scaling.mean, np.float32)
    return x.astype(np.float32)


def random_state(
    model: RecurrentModel, rng: np.random.Generator, batch: int
) -> tuple[np.ndarray, ...]:
    shape = (model.spec.layers, batch, model.spec.hidden_size)
    return tuple(rng.uniform(-1, 1, shape).astype(np.float32) for _ in model.spec.state_names)


class _Tally:
    def __init__(self, model: RecurrentModel) -> None:
        scaling = model.output_scaling
        self.std = np.asarray(scaling.std, np.float32) if scaling is not None else None
        self.out = self.out_raw = self.state = 0.0

    @staticmethod
    def _max(d: np.ndarray) -> float:
        # NaN or inf anywhere is a miss, not a pass: max() of NaN would compare false.
        return float(np.max(d, initial=0.0)) if np.isfinite(d).all() else float("inf")

    def outputs(self, got: np.ndarray, want: np.ndarray, lens: np.ndarray) -> None:
        valid = np.arange(got.shape[0])[:, None] < lens[None, :]
        d = np.abs(got.astype(np.float64) - want.astype(np.float64))[valid]
        self.out_raw = max(self.out_raw, self._max(d))
        if self.std is not None:
            d = d / self.std.astype(np.float64)
        self.out = max(self.out, self._max(d))

    def states(self, got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...]) -> None:
        for g, w in zip(got, want, strict=True):
            self.state = max(self.state, self._max(np.abs(g.astype(np.float64) - w)))


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run PyTorch on one thread for the duration, then restore the caller's setting.

    The check runs hundreds of tiny single-step products; on a loaded machine PyTorch's thread
    pool spends more time synchronising than computing (measured 16x slower on 2 busy cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_parity(
    model: RecurrentModel,
    onnx_bytes: bytes,
    *,
    tolerance: float = 1e-5,
    seed: int = 0,
    provider: str = "CPUExecutionProvider",
) -> ParityReport:
    """Run the parity check; ExportError (saying by how much) when it misses ``tolerance``.

    ``model`` must be on the CPU in eval mode (export passes a copy).
    """
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ExportError(f"tolerance must be a finite number >= 0, got {tolerance}")
    sess = session(onnx_bytes, provider)
    rng = np.random.default_rng(seed)
    tally = _Tally(model)
    steps = 0
    with torch.no_grad(), one_torch_thread():
        for batch, chunks in CASES:
            total = sum(chunks)
            x = random_inputs(model, rng, total, batch)
            state0 = random_state(model, rng, batch)
            # Whole, every session at full length: against the model's own forward().
            y, s = run_graph(sess, model, x, state0, np.full(batch, total, np.int32))
            y_ref, s_ref = model(torch.from_numpy(x), tuple(map(torch.from_numpy, state0)))
            tally.outputs(y, y_ref.numpy(), np.full(batch, total))
            tally.states(s, tuple(t.numpy() for t in s_ref))
            # In chunks with random sequence_lens, each side carrying its own state.
            s_ort, s_pt = state0, tuple(map(torch.from_numpy, state0))
            start = 0
            for length in chunks:
                lens = rng.integers(1, length + 1, size=batch).astype(np.int32)
                lens[0] = length  # one session always runs the whole chunk
                xc = x[start : start + length]
                y, s_ort = run_graph(sess, model, xc, s_ort, lens)
                y_ref, s_pt = reference(model, torch.from_numpy(xc), s_pt, torch.from_numpy(lens))
                tally.outputs(y, y_ref.numpy(), lens)
                tally.states(s_ort, tuple(t.numpy() for t in s_pt))
                start += length
            steps += 2 * total * batch
    worst = max(tally.out, tally.state)
    report = ParityReport(
        max_abs_diff=worst,
        output_max_abs_diff=tally.out,
        output_max_abs_diff_data_units=tally.out_raw,
        state_max_abs_diff=tally.state,
        tolerance=tolerance,
        provider=provider,
        sequences=len(CASES),
        steps=steps,
    )
    if not worst <= tolerance:
        raise ExportError(
            f"parity check failed: ONNX Runtime differs from PyTorch by {worst:.3g} "
            f"(outputs {tally.out:.3g}, states {tally.state:.3g}), tolerance {tolerance:.3g}, "
            f"missed by {worst - tolerance:.3g}; nothing was written"
        )
    return report


def make_golden(model: RecurrentModel, *, seed: int = 1) -> dict[str, np.ndarray]:
    """A batch-1 input/output sequence for the server's load-time self-check.

    Keys are the graph's own input and output names (``x``, ``h0``[, ``c0``], ``sequence_lens``,
    ``y``, ``hn``[, ``cn``]); the outputs are PyTorch's.
    """
    rng = np.random.default_rng(seed)
    x = random_inputs(model, rng, GOLDEN_STEPS, 1)
    state0 = random_state(model, rng, 1)
    with torch.no_grad(), one_torch_thread():
        y, s = model(torch.from_numpy(x), tuple(map(torch.from_numpy, state0)))
    golden: dict[str, np.ndarray] = {INPUT: x, SEQUENCE_LENS: np.array([GOLDEN_STEPS], np.int32)}
    golden[OUTPUT] = y.numpy()
    for name, v0, v in zip(model.spec.state_names, state0, s, strict=True):
        golden[STATE_IO[name][0]] = v0
        golden[STATE_IO[name][1]] = v.numpy()
    return golden
