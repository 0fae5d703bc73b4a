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
    assert engine.self_check(1e-5) == 0.0


def test_self_check_refuses_a_model_that_disagrees(tmp_path: Path):
    folder = write_model(tmp_path, "m")
    golden = dict(np.load(folder / "golden.npz"))
    golden["y"] = golden["y"] + 1e-3
    np.savez(folder / "golden.npz", **golden)
    engine = Engine(folder, load_manifest(folder), [CPU])
    with pytest.raises(ModelLoadError, match=r"self-check failed: max abs difference 0\.001"):
        engine.self_check(1e-4)


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
