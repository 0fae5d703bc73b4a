"""A model version's self-check at load: its golden sequence, run and compared."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from rnnserve.manifest import GOLDEN_FILE
from rnnserve.server.engine import Engine, ModelLoadError


def self_check(engine: Engine, tolerance: float) -> float | None:
    """Run the golden sequence stored with the model; its max abs difference, or None when
    the model has no golden file. ModelLoadError when it disagrees beyond ``tolerance``
    (outputs measured in units of the manifest's output scaling std, states as they are).

    ``golden.npz`` is keyed by the graph's own names, in graph layout (what rnnserve's
    export writes): the step input (``x``), each state input and output (``h0``/``hn``…),
    the step output (``y``) and optionally ``sequence_lens``. Also accepted: unbatched
    ``inputs`` / ``outputs`` / ``state_in_<name>`` / ``state_out_<name>``.
    """
    m = engine.manifest
    path = engine.folder / (m.golden or GOLDEN_FILE)
    if not path.exists():
        if m.golden:
            raise ModelLoadError(f"{path}: golden file named in the manifest is missing")
        return None
    try:
        with np.load(path, allow_pickle=False) as g:
            golden = {k: g[k] for k in g.files}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read it: {exc}") from exc
    if m.input_name not in golden and "inputs" in golden:
        golden = _graph_keys(engine, golden)
    missing = [k for k in (m.input_name, m.output_name) if k not in golden]
    if missing:
        raise ModelLoadError(f"{path}: lacks the array(s) {', '.join(missing)}")
    x = golden[m.input_name]
    states = {}
    for s in m.states:
        value = golden.get(s.input)
        if value is None:
            shape = list(s.shape)
            shape.insert(s.batch_axis, x.shape[1])
            value = np.zeros(shape, np.float32)
        states[s.input] = value.astype(np.float32)
    lengths = golden.get(m.sequence_lens) if m.sequence_lens else None
    try:
        y, new = engine.run(x, states, lengths)
    except Exception as exc:  # ORT's own exception types
        raise ModelLoadError(f"{path}: the golden inputs do not run: {exc}") from None
    got = {m.output_name: y, **new}
    # Outputs are compared in the model's scaled units (as export's parity check does):
    # one float32 rounding step of a raw 350 ppm forecast is already 3e-5.
    scale = {m.output_name: np.asarray(m.output_scaling.std if m.output_scaling else 1.0)}
    diffs = []
    for name in (m.output_name, *(s.output for s in m.states)):
        want = golden.get(name)
        if want is None:
            continue
        same = got[name].shape == want.shape
        err = np.abs(got[name] - want) / scale.get(name, 1.0) if same else np.inf
        diffs.append(float(np.max(err)))
    worst = max(diffs)
    if not worst <= tolerance:
        raise ModelLoadError(
            f"{m.name}/{m.version}: self-check failed: max abs difference {worst:.3g} from "
            f"{path.name} exceeds {tolerance:g} on {engine.provider}"
        )
    return worst


def _graph_keys(engine: Engine, golden: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """Unbatched inputs/outputs/state_in_*/state_out_* -> graph names, batch 1."""
    m = engine.manifest
    out = {m.input_name: np.expand_dims(golden["inputs"], 1)}
    if "outputs" in golden:
        out[m.output_name] = np.expand_dims(golden["outputs"], 1)
    for s in m.states:
        for key, name in ((f"state_in_{s.name}", s.input), (f"state_out_{s.name}", s.output)):
            if key in golden:
                out[name] = np.expand_dims(golden[key], s.batch_axis)
    return out
