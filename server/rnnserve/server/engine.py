"""One ONNX Runtime session per model version: provider choice, batched runs, self-check.

``Engine.run`` is blocking: the batcher calls it on the model's worker thread for large
batches (ONNX Runtime releases the GIL while it computes) and on the event loop for small
ones, where handing a run to a thread costs more than the run; small batches run on buffers
bound once per shape (``_Bound``). The engine knows where each recurrent node runs: it
profiles one run at load and reads each GRU/LSTM/RNN node's provider from the profile, so a
silent CPU fallback on a GPU machine shows in the log, in ``ModelInfo.provider`` and in
``rnnserve_model_info``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from rnnserve.manifest import MODEL_FILE, Manifest

log = logging.getLogger("rnnserve.server.engine")

RNN_OPS = frozenset({"GRU", "LSTM", "RNN"})
#: Batches whose buffers (inputs, states in and out, outputs) take at most this many bytes run
#: on pre-bound buffers (see _Bound); the bindings of the last BIND_CACHE_SIZE shapes are kept.
#: Every shape binds views of one set of flat buffers per engine (``Engine._flat``), so a
#: cached shape costs an IOBinding, not buffers of its own.
BIND_MAX_BYTES = 64 << 20
BIND_CACHE_SIZE = 1024
_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ModelLoadError(RuntimeError):
    """A model version cannot be served; the message says why."""


def cuda_device_present() -> bool:
    """True when the CUDA driver is installed and sees at least one device.

    Asked before requesting the CUDA provider, because onnxruntime-gpu lists CUDA as available
    on machines without a GPU and then logs an error when asked for it.
    """
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    try:
        return (
            lib.cuInit(0) == 0
            and lib.cuDeviceGetCount(ctypes.byref(count)) == 0
            and (count.value > 0)
        )
    except AttributeError:
        return False


def choose_providers(requested: list[str] | None) -> list[str]:
    """The providers to ask for: ``requested`` as given, or for auto CUDA then CPU where a
    CUDA device is really there, the CPU alone otherwise."""
    if requested:
        unknown = [p for p in requested if p not in ort.get_all_providers()]
        if unknown:
            raise ModelLoadError(f"unknown execution provider(s): {', '.join(unknown)}")
        return requested
    if CUDA in ort.get_available_providers() and cuda_device_present():
        return [CUDA, CPU]
    return [CPU]


class Engine:
    """A loaded model version, ready to run batches of chunks."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        providers: list[str],
        intra_op_threads: int = 1,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Profile the first run only, to learn where each recurrent node landed.
        profile_dir = tempfile.mkdtemp(prefix="rnnserve-profile-")
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(profile_dir, "load")
        try:
            try:
                self.session = ort.InferenceSession(
                    str(folder / MODEL_FILE), opts, providers=providers
                )
            except Exception as exc:  # ORT raises its own exception types for bad graphs
                raise ModelLoadError(
                    f"{folder / MODEL_FILE}: ONNX Runtime cannot load it: {exc}"
                ) from None
            self._check_graph()
            self._output_names = [manifest.output_name, *(s.output for s in manifest.states)]
            self._bind = True
            self._bindings: dict[tuple[tuple[int, ...], str], _Bound] = {}
            #: The flat buffers every binding views, by graph name (grown by doubling).
            self._flat: dict[str, npt.NDArray[Any]] = {}
            self._row_bytes, self._step_bytes = self._bound_bytes()
            self.providers: list[str] = list(self.session.get_providers())
            self.provider = self.providers[0]
            try:
                self.run(*self.zero_batch())
            except Exception as exc:
                raise ModelLoadError(
                    f"{folder / MODEL_FILE}: a one-step run fails: {exc}"
                ) from None
            self.node_providers = self._read_profile(self.session.end_profiling())
        finally:
            shutil.rmtree(profile_dir, ignore_errors=True)
        if self.node_providers:
            # The provider that runs the recurrence is the one that matters for speed.
            self.provider = sorted(set(self.node_providers.values()))[0]
            if set(self.node_providers.values()) - {self.providers[0]}:
                log.warning(
                    "%s/%s: recurrent nodes run on %s although %s was asked for first",
                    manifest.name, manifest.version, self.node_providers, self.providers[0],
                )  # fmt: skip

    def _check_graph(self) -> None:
        m = self.manifest
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        need_in = {m.input_name, *(s.input for s in m.states)}
        if m.sequence_lens:
            need_in.add(m.sequence_lens)
        need_out = {m.output_name, *(s.output for s in m.states)}
        missing = sorted(need_in - inputs) + sorted(need_out - outputs)
        if missing:
            raise ModelLoadError(
                f"{self.folder}: the graph lacks {', '.join(missing)} named in the manifest"
            )
        extra = sorted(inputs - need_in)
        if extra:
            raise ModelLoadError(f"{self.folder}: graph inputs {extra} are not in the manifest")

    def zero_batch(self) -> tuple[npt.NDArray[np.generic], dict[str, npt.NDArray[np.float32]]]:
        """One session, one step of zeros: the input ``[1, 1, ...]`` and the states by graph
        input name, as ``run`` takes them."""
        m = self.manifest
        x: npt.NDArray[np.generic]
        if m.input_kind == "tokens":
            x = np.zeros((1, 1), dtype=np.int64)
        else:
            x = np.zeros((1, 1, m.input_size), dtype=np.float32)
        states = {
            s.input: np.zeros(tuple(np.insert(s.shape, s.batch_axis, 1)), dtype=np.float32)
            for s in m.states
        }
        return x, states

    @staticmethod
    def _read_profile(path: str) -> dict[str, str]:
        """Node name -> provider of every recurrent node in an ORT profile file."""
        try:
            events = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return {}
        placed: dict[str, str] = {}
        for e in events:
            args = e.get("args", {})
            if e.get("cat") == "Node" and args.get("op_name") in RNN_OPS and "provider" in args:
                placed[e["name"].removesuffix("_kernel_time")] = args["provider"]
        return placed

    def run(
        self,
        x: npt.NDArray[np.generic],
        states: dict[str, npt.NDArray[np.float32]],
        lengths: npt.NDArray[np.int32] | None = None,
    ) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]]]:
        """Run one batch: ``x`` time-major ``[T, B, ...]``, states by graph input name in graph
        layout, ``lengths`` int32 ``[B]`` (each <= T) when the model takes sequence_lens.

        Returns the outputs ``[T, B, outputs]`` and the new states by graph output name. The
        returned arrays may be the engine's own buffers: they hold until the next run, so copy
        what must outlive it. Blocking and not reentrant (one run at a time, which the batcher
        guarantees); call it from the worker thread or, for a small batch, the event loop.
        """
        if self.manifest.sequence_lens and lengths is None:
            lengths = np.full(x.shape[1], x.shape[0], dtype=np.int32)
        bound = self._bindings.get((x.shape, x.dtype.char))  # a shape bound before
        if bound is not None:
            return bound.run(x, states, lengths)
        if self._bind and self._fits(x):
            result = self._bind_and_run(x, states, lengths)
            if result is not None:
                return result
        return self._run_plain(x, states, lengths)

    def _bound_bytes(self) -> tuple[int, int]:
        """Bytes a bound shape ``[T, B]`` takes per batch row (states in and out, lengths) and
        per step of a row (input and output), for ``_fits``; 8 bytes a value, the widest."""
        m = self.manifest
        state_values = sum(int(np.prod(s.shape)) for s in m.states)
        features = 1 if m.input_kind == "tokens" else m.input_size
        return 8 * state_values + 4, 8 * features + 8 * m.output_size

    def _fits(self, x: npt.NDArray[np.generic]) -> bool:
        """Whether a batch ``x`` ``[T, B, ...]`` is small enough to run on bound buffers."""
        steps, batch = int(x.shape[0]), int(x.shape[1])
        return batch * (self._row_bytes + steps * self._step_bytes) <= BIND_MAX_BYTES

    def buffers(
        self, shapes: dict[str, tuple[tuple[int, ...], np.dtype[Any]]]
    ) -> dict[str, npt.NDArray[Any]]:
        """Arrays of the given shapes and dtypes by graph name, each a view of the start of
        the engine's flat buffer of that name: the same memory for every shape, so binding a
        new shape allocates nothing once the buffers have grown to fit the largest. A buffer
        that must grow is replaced (doubling), and every binding to the old one is dropped."""
        sizes = {name: int(np.prod(shape)) for name, (shape, _) in shapes.items()}
        grown = False
        for name, (_, dtype) in shapes.items():
            need = sizes[name]
            flat = self._flat.get(name)
            if flat is None or flat.dtype != dtype or flat.size < need:
                size = need if flat is None or flat.dtype != dtype else max(need, 2 * flat.size)
                self._flat[name] = np.zeros(size, dtype)
                grown = True
        if grown:
            self._bindings.clear()
        return {
            name: self._flat[name][: sizes[name]].reshape(shape)
            for name, (shape, _) in shapes.items()
        }

    def _run_plain(
        self,
        x: npt.NDArray[np.generic],
        states: dict[str, npt.NDArray[np.float32]],
        lengths: npt.NDArray[np.int32] | None,
    ) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]]]:
        """``InferenceSession.run``: every input converted, every output allocated."""
        feed: dict[str, npt.NDArray[Any]] = dict(states)
        feed[self.manifest.input_name] = x
        if lengths is not None and self.manifest.sequence_lens:
            feed[self.manifest.sequence_lens] = lengths
        results = self.session.run(self._output_names, feed)
        outs = {s.output: results[i + 1] for i, s in enumerate(self.manifest.states)}
        return results[0], outs

    def _bind_and_run(
        self,
        x: npt.NDArray[np.generic],
        states: dict[str, npt.NDArray[np.float32]],
        lengths: npt.NDArray[np.int32] | None,
    ) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]]] | None:
        """Bind buffers for ``x``'s shape and run; None when binding fails where the plain run
        succeeds (a graph whose outputs are not what the manifest says): then binding stays
        off for this engine and the plain run serves every shape."""
        if len(self._bindings) >= BIND_CACHE_SIZE:
            del self._bindings[next(iter(self._bindings))]  # the oldest shape
        try:
            bound = _Bound(self, x, states)
            result = bound.run(x, states, lengths)
        except Exception as exc:  # ORT's own exception types
            self._run_plain(x, states, lengths)  # raises when the run itself is bad
            log.info(
                "%s/%s: runs without pre-bound buffers (%s)",
                self.manifest.name, self.manifest.version, exc,
            )  # fmt: skip
            self._bind = False
            self._bindings.clear()
            return None
        self._bindings[(x.shape, x.dtype.char)] = bound
        return result


class _Bound:
    """An ONNX Runtime IOBinding of one batch shape, bound once to views of the engine's flat
    buffers (``Engine.buffers``).

    A plain ``InferenceSession.run`` converts every input and allocates every output on each
    call; with the buffers bound, a run is a few copies into them and one call. Measured on
    char-gru at batch 1 with the CPU idling between steps (as it does between a client's
    steps): 60 against 92 µs a run; 17 against 28 µs back to back. Binding a shape costs about
    50 µs (and before the shapes shared one set of buffers, fresh pages too), so a server whose
    batch sizes wander keeps a binding per shape. Inputs are copied into the bound buffers, so
    the caller's arrays are never aliased by ONNX Runtime.
    """

    __slots__ = (
        "binding",
        "lengths",
        "new_states",
        "outputs",
        "session",
        "states",
        "x",
        "y",
    )

    def __init__(
        self, engine: Engine, x: npt.NDArray[np.generic], states: dict[str, npt.NDArray[Any]]
    ) -> None:
        m = engine.manifest
        steps, batch = x.shape[0], x.shape[1]
        self.session = engine.session
        self.binding = engine.session.io_binding()
        types = {o.name: _NUMPY_TYPES.get(o.type) for o in engine.session.get_outputs()}
        shapes: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {
            m.input_name: (x.shape, x.dtype)
        }
        for name, value in states.items():
            shapes[name] = (value.shape, value.dtype)
        if m.sequence_lens:
            shapes[m.sequence_lens] = ((batch,), np.dtype(np.int32))
        outputs: dict[str, tuple[int, ...]] = {m.output_name: (steps, batch, m.output_size)}
        for s in m.states:
            dims = list(s.shape)
            dims.insert(s.batch_axis, batch)
            outputs[s.output] = tuple(dims)
        for name, shape in outputs.items():
            dtype = types.get(name)
            if dtype is None:
                raise ModelLoadError(f"output {name} has a type the engine does not bind")
            shapes[name] = (shape, np.dtype(dtype))
        views = engine.buffers(shapes)
        self.x = views[m.input_name]
        self.states = {name: views[name] for name in states}
        self.lengths = views[m.sequence_lens] if m.sequence_lens else None
        self.outputs = {name: views[name] for name in outputs}
        bind = self.binding
        for name, buf in views.items():
            if name in outputs:
                bind.bind_output(name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
            else:
                bind.bind_input(name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
        self.y = self.outputs[m.output_name]
        #: The new states by output name: the same dict of views each run.
        self.new_states = {s.output: self.outputs[s.output] for s in m.states}

    def run(
        self,
        x: npt.NDArray[np.generic],
        states: dict[str, npt.NDArray[np.float32]],
        lengths: npt.NDArray[np.int32] | None,
    ) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]]]:
        # Slice assignment: for the small arrays of most runs, cheaper than np.copyto's
        # argument parsing.
        self.x[...] = x
        for name, buf in self.states.items():
            buf[...] = states[name]
        if self.lengths is not None and lengths is not None:
            self.lengths[...] = lengths
        # No RunOptions: with one, onnxruntime looks up an unset config entry on every run and
        # that lookup raises and catches a C++ exception (40 µs, measured with onnxruntime 1.31).
        self.session.run_with_iobinding(self.binding, None)
        return self.y, self.new_states
