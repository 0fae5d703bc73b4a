"""The notes' cells against plain NumPy transcriptions of their equations (written here, not
imported), the gate behaviour the notes name, and whole-sequence == step-by-step models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rnnserve.export.cells import (
    MinimalGRUCell,
    NotesCell,
    NotesGRUCell,
    NotesLSTMCell,
    NotesStack,
    RNNCell,
)
from rnnserve.export.model import build_model
from rnnserve.export.spec import ModelSpec
from rnnserve.manifest import Scaling

B, IN, H = 3, 4, 5


def sigma(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def random_gates(rng: np.random.Generator, names: str) -> dict[str, np.ndarray]:
    """Per gate g: b_g [H], W_gx [IN, H], W_gc [H, H] (the notes' (W)ᵀ·v is v @ W here)."""
    out = {}
    for g in names:
        out[f"b_{g}"] = rng.normal(0, 0.5, H)
        out[f"W_{g}x"] = rng.normal(0, 0.5, (IN, H))
        out[f"W_{g}c"] = rng.normal(0, 0.5, (H, H))
    return out


def load(cell: NotesCell, p: dict[str, np.ndarray], order: str) -> None:
    """Put the notes' per-gate matrices into the cell's documented layout (gates stacked)."""
    with torch.no_grad():
        cell.weight_x.copy_(torch.tensor(np.concatenate([p[f"W_{g}x"].T for g in order])))
        cell.weight_h.copy_(torch.tensor(np.concatenate([p[f"W_{g}c"].T for g in order])))
        cell.bias.copy_(torch.tensor(np.concatenate([p[f"b_{g}"] for g in order])))


def step(cell: NotesCell, x: np.ndarray, *state: np.ndarray) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        a, s = cell.step(
            torch.tensor(x, dtype=torch.float32),
            tuple(torch.tensor(v, dtype=torch.float32) for v in state),
        )
    return (a.numpy(), *(v.numpy() for v in s))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_plain_rnn_matches_equations(rng: np.random.Generator) -> None:
    p = random_gates(rng, "a")
    cell = RNNCell(IN, H)
    load(cell, p, "a")
    x, a_prev = rng.normal(size=(B, IN)), rng.normal(size=(B, H))
    # z = b + W_aa·a<t-1> + W_ax·x<t>; a = tanh(z)
    want = np.tanh(p["b_a"] + a_prev @ p["W_ac"] + x @ p["W_ax"])
    a, a_state = step(cell, x, a_prev)
    np.testing.assert_allclose(a, want, atol=1e-5)
    np.testing.assert_array_equal(a, a_state)


def test_minimal_gru_matches_equations(rng: np.random.Generator) -> None:
    p = random_gates(rng, "uc")
    cell = MinimalGRUCell(IN, H)
    load(cell, p, "uc")
    x, c_prev = rng.normal(size=(B, IN)), rng.normal(size=(B, H))
    c_tilde = np.tanh(p["b_c"] + c_prev @ p["W_cc"] + x @ p["W_cx"])
    gamma_u = sigma(p["b_u"] + c_prev @ p["W_uc"] + x @ p["W_ux"])
    want = gamma_u * c_tilde + (1 - gamma_u) * c_prev
    a, c = step(cell, x, c_prev)
    np.testing.assert_allclose(c, want, atol=1e-5)
    np.testing.assert_array_equal(a, c)  # a<t> = c<t>


def test_notes_gru_matches_equations(rng: np.random.Generator) -> None:
    p = random_gates(rng, "urc")
    cell = NotesGRUCell(IN, H)
    load(cell, p, "urc")
    x, c_prev = rng.normal(size=(B, IN)), rng.normal(size=(B, H))
    gamma_u = sigma(p["b_u"] + c_prev @ p["W_uc"] + x @ p["W_ux"])
    gamma_r = sigma(p["b_r"] + c_prev @ p["W_rc"] + x @ p["W_rx"])
    # The relevance gate multiplies c<t-1> before the recurrent product.
    c_tilde = np.tanh(p["b_c"] + (gamma_r * c_prev) @ p["W_cc"] + x @ p["W_cx"])
    want = gamma_u * c_tilde + (1 - gamma_u) * c_prev
    a, c = step(cell, x, c_prev)
    np.testing.assert_allclose(c, want, atol=1e-5)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("output", ["notes", "tanh"])
def test_notes_lstm_matches_equations(rng: np.random.Generator, output: str) -> None:
    p = random_gates(rng, "ufoc")
    cell = NotesLSTMCell(IN, H, output=output)  # type: ignore[arg-type]
    load(cell, p, "ufoc")
    x, a_prev, c_prev = (rng.normal(size=s) for s in ((B, IN), (B, H), (B, H)))
    gamma_u = sigma(p["b_u"] + a_prev @ p["W_uc"] + x @ p["W_ux"])
    gamma_f = sigma(p["b_f"] + a_prev @ p["W_fc"] + x @ p["W_fx"])
    gamma_o = sigma(p["b_o"] + a_prev @ p["W_oc"] + x @ p["W_ox"])
    c_tilde = np.tanh(p["b_c"] + a_prev @ p["W_cc"] + x @ p["W_cx"])
    c_want = gamma_u * c_tilde + gamma_f * c_prev
    a_want = gamma_o * c_want if output == "notes" else gamma_o * np.tanh(c_want)
    a, a_state, c = step(cell, x, a_prev, c_prev)
    np.testing.assert_allclose(c, c_want, atol=1e-5)
    np.testing.assert_allclose(a, a_want, atol=1e-5)
    np.testing.assert_array_equal(a, a_state)


def _force_gate(cell: NotesCell, gate: str, bias: float) -> None:
    """Saturate one gate through its bias: σ(-1e4) is exactly 0 and σ(1e4) exactly 1 in fp32."""
    with torch.no_grad():
        cell.bias[cell.gate(gate)] = bias


@pytest.mark.parametrize("cls", [MinimalGRUCell, NotesGRUCell])
def test_update_gate_zero_keeps_the_cell(rng: np.random.Generator, cls: type[NotesCell]) -> None:
    cell = cls(IN, H)
    _force_gate(cell, "u", -1e4)
    c_prev = rng.normal(size=(B, H))
    for _ in range(3):
        _, c = step(cell, rng.normal(size=(B, IN)), c_prev)
        np.testing.assert_array_equal(c, c_prev.astype(np.float32))


@pytest.mark.parametrize("cls", [MinimalGRUCell, NotesGRUCell])
def test_update_gate_one_takes_the_proposal(rng: np.random.Generator, cls: type[NotesCell]) -> None:
    cell = cls(IN, H)
    _force_gate(cell, "u", 1e4)
    x = rng.normal(size=(B, IN))
    _, c1 = step(cell, x, rng.normal(size=(B, H)))
    assert np.all(np.abs(c1) < 1)  # c̃ is a tanh
    assert not np.allclose(c1, 0)


def test_lstm_gates_keep_and_forget(rng: np.random.Generator) -> None:
    cell = NotesLSTMCell(IN, H, output="notes")
    x, a_prev = rng.normal(size=(B, IN)), rng.normal(size=(B, H))
    c_prev = rng.normal(size=(B, H)) * 3
    # Γu = 0, Γf = 1: the memory cell is kept exactly.
    _force_gate(cell, "u", -1e4)
    _force_gate(cell, "f", 1e4)
    _, _, c = step(cell, x, a_prev, c_prev)
    np.testing.assert_array_equal(c, c_prev.astype(np.float32))
    # Γf = 0: the old memory is forgotten, c<t> no longer depends on c<t-1>.
    _force_gate(cell, "u", 0.0)
    _force_gate(cell, "f", -1e4)
    _, _, c_a = step(cell, x, a_prev, c_prev)
    _, _, c_b = step(cell, x, a_prev, -c_prev)
    np.testing.assert_array_equal(c_a, c_b)
    assert not np.allclose(c_a, c_prev)


def test_stack_feeds_each_layer_the_one_below(rng: np.random.Generator) -> None:
    stack = NotesStack("notes-gru", IN, H, layers=2)
    x = torch.tensor(rng.normal(size=(B, IN)), dtype=torch.float32)
    h = torch.tensor(rng.normal(size=(2, B, H)), dtype=torch.float32)
    with torch.no_grad():
        a_top, (h_new,) = stack.step(x, (h,))
        a0, _ = stack.cells[0].step(x, (h[0],))
        a1, _ = stack.cells[1].step(a0, (h[1],))
    torch.testing.assert_close(a_top, a1, rtol=0, atol=0)
    torch.testing.assert_close(h_new, torch.stack([a0, a1]), rtol=0, atol=0)


CELLS = ["rnn", "notes-mingru", "notes-gru", "notes-lstm", "gru", "lstm"]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind", ["features", "tokens"])
def test_whole_sequence_equals_step_by_step(cell: str, kind: str) -> None:
    torch.manual_seed(0)
    tokens = kind == "tokens"
    spec = ModelSpec(
        cell=cell,
        input_kind=kind,  # type: ignore[arg-type]
        input_size=6,
        hidden_size=5,
        layers=2,
        output_size=6 if tokens else 2,
        embedding_dim=3 if tokens else 0,
        lstm_output="notes",
    )
    model = build_model(
        spec,
        input_scaling=None if tokens else Scaling(mean=[10.0] * 6, std=[3.0] * 6),
        output_scaling=None if tokens else Scaling(mean=[-1.0, 5.0], std=[2.0, 0.5]),
    )
    x = torch.randint(0, 6, (9, 3)) if tokens else 10 + 3 * torch.randn(9, 3, 6)
    state = tuple(torch.randn(2, 3, 5) for _ in spec.state_names)
    with torch.no_grad():
        y, final = model(x, state)
        s, ys = state, []
        for t in range(x.shape[0]):
            y_t, s = model.step(x[t], s)
            ys.append(y_t)
    assert y.shape == (9, 3, spec.output_size)
    torch.testing.assert_close(y, torch.stack(ys), rtol=0, atol=1e-5)
    for a, b in zip(final, s, strict=True):
        assert a.shape == (2, 3, 5)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_scaling_is_baked_in() -> None:
    spec = ModelSpec("gru", "features", input_size=1, hidden_size=3, layers=1, output_size=1)
    plain = build_model(spec)
    scaled = build_model(
        spec,
        input_scaling=Scaling(mean=[100.0], std=[4.0]),
        output_scaling=Scaling(mean=[50.0], std=[2.0]),
    )
    scaled.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(5, 2, 1)
    with torch.no_grad():
        y_plain, _ = plain(x)
        y_scaled, _ = scaled(100 + 4 * x)
    torch.testing.assert_close(y_scaled, 50 + 2 * y_plain)
    assert scaled.input_scaling == Scaling(mean=[100.0], std=[4.0])
    assert plain.output_scaling is None


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown cell kind"):
        build_model(ModelSpec("transformer", "features", 2, 3, 1, 1))
    with pytest.raises(ValueError, match="hidden_size"):
        build_model(ModelSpec("gru", "features", 2, 0, 1, 1))
    with pytest.raises(ValueError, match="2 means"):
        build_model(ModelSpec("gru", "features", 2, 3, 1, 1), input_scaling=Scaling([0.0], [1.0]))
    model = build_model(ModelSpec("lstm", "features", 2, 3, 2, 1))
    with pytest.raises(ValueError, match="state needs 2 tensors"):
        model(torch.zeros(4, 1, 2), (torch.zeros(2, 1, 3),))
    with pytest.raises(ValueError, match="expected"):
        model(torch.zeros(4, 1, 2), (torch.zeros(1, 1, 3), torch.zeros(1, 1, 3)))


@pytest.mark.parametrize("cell", ["notes-lstm", "lstm"])
def test_fresh_lstm_starts_with_forget_gate_near_sigma_one(cell: str) -> None:
    """Forget-gate bias +1 at construction (cells.LSTM_FORGET_BIAS), in every layer.

    Measured through the model on layer 0: at zero input and zero ``a<t-1>``,
    ``c<t> = Γu ⊙ c̃ + Γf ⊙ c<t-1>``, so flipping the sign of ``c<t-1>`` changes ``c<t>`` by
    exactly ``2 Γf ⊙ c<t-1>``. A higher layer reads layer 0's output, which differs between the
    two runs, so there the forget gate's total bias is read from the parameters instead.
    """
    torch.manual_seed(0)
    layers, hidden = 2, 8
    model = build_model(ModelSpec(cell, "features", 3, hidden, layers, 1, lstm_output="tanh"))
    c_prev = torch.full((layers, 2, hidden), 2.0)
    zeros = torch.zeros(layers, 2, hidden)
    with torch.no_grad():
        _, (_, c_plus) = model(torch.zeros(1, 2, 3), (zeros, c_prev))
        _, (_, c_minus) = model(torch.zeros(1, 2, 3), (zeros, -c_prev))
    gamma_f = (c_plus[0] - c_minus[0]) / (2 * c_prev[0])
    sigma_one = float(sigma(np.array(1.0)))  # ≈ 0.731
    torch.testing.assert_close(gamma_f, torch.full((2, hidden), sigma_one), rtol=0, atol=1e-6)
    for layer in range(layers):
        if cell == "notes-lstm":
            assert isinstance(model.rnn, NotesStack)
            notes = model.rnn.cells[layer]
            assert isinstance(notes, NotesLSTMCell)
            forget_bias = notes.bias[notes.gate("f")]
        else:  # nn.LSTM: two biases, gates stacked i, f, g, o
            f = slice(hidden, 2 * hidden)
            forget_bias = (
                getattr(model.rnn, f"bias_ih_l{layer}")[f]
                + getattr(model.rnn, f"bias_hh_l{layer}")[f]
            )
        torch.testing.assert_close(forget_bias.detach(), torch.ones(hidden), rtol=0, atol=1e-7)
