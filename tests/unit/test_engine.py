"""Engine: provider choice, node placement, and the load-time self-check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rnnserve.manifest import load_manifest
from rnnserve.server.engine import (
    CPU,
    Engine,
    ModelLoadError,
    choose_providers,
    cuda_device_present,
)
from rnnserve.server.golden import self_check

from tests.support.modelgen import write_model


def test_auto_providers_match_the_machine():
    chosen = choose_providers(None)
    assert chosen[-1] == CPU
    assert (chosen[0] == "CUDAExecutionProvider") == cuda_device_present()


def test_unknown_provider_is_refused():
    with pytest.raises(ModelLoadError, match="unknown execution provider"):
        choose_providers(["NoSuchExecutionProvider"])


def test_node_placement_and_self_check(tmp_path: Path):
    folder = write_model(tmp_path, "m", cell="lstm", layers=3)
    engine = Engine(folder, load_manifest(folder), [CPU])
    assert engine.provider == CPU
    assert engine.node_providers == {f"lstm{i}": CPU for i in range(3)}
    assert self_check(engine, 1e-5) == 0.0


def test_self_check_refuses_a_model_that_disagrees(tmp_path: Path):
    folder = write_model(tmp_path, "m")
    golden = dict(np.load(folder / "golden.npz"))
    golden["y"] = golden["y"] + 1e-3
    np.savez(folder / "golden.npz", **golden)
    engine = Engine(folder, load_manifest(folder), [CPU])
    with pytest.raises(ModelLoadError, match=r"self-check failed: max abs difference 0\.001"):
        self_check(engine, 1e-4)


def test_graph_that_lacks_a_manifest_name(tmp_path: Path):
    folder = write_model(tmp_path, "m")
    other = write_model(tmp_path, "lstm", cell="lstm")
    (folder / "model.onnx").write_bytes((other / "model.onnx").read_bytes())
    with pytest.raises(ModelLoadError, match="graph inputs \\['c0'\\] are not in the manifest"):
        Engine(folder, load_manifest(folder), [CPU])


def test_unreadable_graph_is_a_load_error(tmp_path: Path):
    folder = write_model(tmp_path, "m")
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load it"):
        Engine(folder, load_manifest(folder), [CPU])


def _plain_run(engine: Engine, x, states, lengths):
    m = engine.manifest
    feed = {**states, m.input_name: x, m.sequence_lens: lengths}
    names = [m.output_name, *(s.output for s in m.states)]
    y, *rest = engine.session.run(names, feed)
    return y, {s.output: r for s, r in zip(m.states, rest, strict=True)}


def test_bound_runs_equal_plain_runs_for_every_shape(tmp_path: Path):
    folder = write_model(tmp_path, "m", cell="lstm", layers=2)
    engine = Engine(folder, load_manifest(folder), [CPU])
    rng = np.random.default_rng(1)
    for steps, batch in [(1, 1), (3, 2), (1, 1), (5, 4), (3, 2)]:
        x = rng.standard_normal((steps, batch, 3)).astype(np.float32)
        states = {
            s.input: rng.standard_normal((2, batch, 8)).astype(np.float32)
            for s in engine.manifest.states
        }
        lengths = rng.integers(1, steps + 1, batch).astype(np.int32)
        kept = {k: v.copy() for k, v in states.items()}
        y, new = engine.run(x, states, lengths)
        y_ref, new_ref = _plain_run(engine, x, states, lengths)
        np.testing.assert_array_equal(y, y_ref)
        for name, ref in new_ref.items():
            np.testing.assert_array_equal(new[name], ref)
        for name, before in kept.items():  # the caller's arrays are read, never written
            np.testing.assert_array_equal(states[name], before)
    # The largest shape grew the flat buffers (dropping older bindings); smaller shapes now
    # bind views of the same memory: one binding per shape, nothing allocated.
    flat = {name: buf for name, buf in engine._flat.items()}
    for steps, batch in [(1, 1), (3, 2), (5, 4)]:
        x = np.zeros((steps, batch, 3), np.float32)
        states = {s.input: np.zeros((2, batch, 8), np.float32) for s in engine.manifest.states}
        engine.run(x, states, np.full(batch, steps, np.int32))
    assert engine._bind and len(engine._bindings) == 3
    assert all(engine._flat[name] is buf for name, buf in flat.items())


def test_binding_cache_keeps_the_newest_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import rnnserve.server.engine as engine_module

    monkeypatch.setattr(engine_module, "BIND_CACHE_SIZE", 2)
    folder = write_model(tmp_path, "m")
    engine = Engine(folder, load_manifest(folder), [CPU])
    for batch in (1, 2, 3, 4):
        x = np.zeros((1, batch, 3), np.float32)
        states = {s.input: np.zeros((2, batch, 8), np.float32) for s in engine.manifest.states}
        engine.run(x, states, np.ones(batch, np.int32))
    assert [shape for shape, _ in engine._bindings] == [(1, 3, 3), (1, 4, 3)]


def test_a_graph_whose_outputs_differ_from_the_manifest_runs_unbound(tmp_path: Path):
    # The manifest says 2 outputs per step, the graph gives 3: binding [T, B, 2] fails, the
    # plain run serves it (the batcher reads the width from what the run returns).
    folder = write_model(tmp_path, "m", output_size=3)
    manifest_path = folder / "manifest.json"
    manifest_path.write_text(
        manifest_path.read_text().replace('"output_size": 3', '"output_size": 2')
    )
    engine = Engine(folder, load_manifest(folder), [CPU])
    assert not engine._bind
    x = np.zeros((2, 1, 3), np.float32)
    states = {s.input: np.zeros((2, 1, 8), np.float32) for s in engine.manifest.states}
    y, _ = engine.run(x, states, np.array([2], np.int32))
    assert y.shape == (2, 1, 3)


def test_bound_runs_of_one_session_match_plain_runs_as_shapes_come_back(tmp_path: Path):
    """Bound shapes share buffers: a shape bound again after others (and after a run with a
    shorter sequence_lens) still gives exactly the plain run's answer."""
    folder = write_model(tmp_path, "m", cell="lstm", layers=2)
    engine = Engine(folder, load_manifest(folder), [CPU])
    m = engine.manifest
    rng = np.random.default_rng(3)
    state = {s.input: rng.standard_normal((2, 1, 8)).astype(np.float32) for s in m.states}
    for steps in (3, 1, 3):  # a new shape, then bound shapes again (lengths kept right)
        x = rng.standard_normal((steps, 1, 3)).astype(np.float32)
        y_ref, new_ref = _plain_run(engine, x, state, np.array([steps], np.int32))
        engine.run(x, state, np.array([1], np.int32))
        y, new = engine.run(x, state, np.array([steps], np.int32))
        np.testing.assert_array_equal(y, y_ref)
        for name, value in new_ref.items():
            np.testing.assert_array_equal(new[name], value)
        state = {s.input: new_ref[s.output].copy() for s in m.states}


def test_a_batch_too_large_to_bind_runs_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import rnnserve.server.engine as engine_module

    folder = write_model(tmp_path, "m")
    engine = Engine(folder, load_manifest(folder), [CPU])
    small = engine._fits(np.zeros((1, 2, 3), np.float32))
    monkeypatch.setattr(engine_module, "BIND_MAX_BYTES", 1)  # nothing fits now
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 3)).astype(np.float32)
    states = {
        s.input: rng.standard_normal((2, 3, 8)).astype(np.float32) for s in engine.manifest.states
    }
    lengths = np.array([4, 2, 3], np.int32)
    before = dict(engine._bindings)
    y, new = engine.run(x, states, lengths)
    y_ref, new_ref = _plain_run(engine, x, states, lengths)
    assert small and engine._bindings == before  # no binding made for it
    np.testing.assert_array_equal(y, y_ref)
    for name, ref in new_ref.items():
        np.testing.assert_array_equal(new[name], ref)
