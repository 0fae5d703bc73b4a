"""A served model version: its manifest, engine, slot pool and batcher, and the checks that
turn a client's chunk or state into arrays the engine can take."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
from rnnserve.manifest import Manifest
from rnnserve.server.batcher import Batcher
from rnnserve.server.engine import Engine
from rnnserve.server.errors import invalid
from rnnserve.server.metrics import ModelMetrics
from rnnserve.server.settings import Settings
from rnnserve.server.state import SlotPool
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import TensorError, dtype_to_proto, from_tensor

#: Chunks of at most this many values are checked in Python rather than numpy (measured
#: crossover: a Python min/max or sum over 64-128 values costs what one numpy reduction does).
_PY_CHECK_MAX = 64
#: memoryview casts read native order; wire bytes are little-endian.
_NATIVE_LE = sys.byteorder == "little"

_INPUT_KIND: dict[str, pb.InputKind.ValueType] = {
    "features": pb.INPUT_KIND_FEATURES,
    "tokens": pb.INPUT_KIND_TOKENS,
}
_OUTPUT_KIND: dict[str, pb.OutputKind.ValueType] = {
    "regression": pb.OUTPUT_KIND_REGRESSION,
    "logits": pb.OUTPUT_KIND_LOGITS,
}


class ServedModel:
    """One model version as the server holds it. Sessions keep a reference to the version
    they opened on, so a hot reload never moves them."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        engine: Engine,
        settings: Settings,
        metrics: ModelMetrics,
    ) -> None:

        self.folder = folder
        self.manifest = manifest
        self.engine = engine
        self.label = f"{manifest.name}/{manifest.version}"
        self.metrics = metrics
        self.pool = SlotPool(manifest.states)
        self.max_chunk = settings.max_chunk_length
        self.reject_nonfinite = settings.nan_policy == "reject"
        self.tokens = manifest.input_kind == "tokens"
        self.input_dtype = np.dtype(np.int64 if self.tokens else np.float32)
        self.wire_dtype = self.input_dtype.newbyteorder("<")
        self.input_code = pb.DTYPE_INT64 if self.tokens else pb.DTYPE_FLOAT32
        self.input_rank = 1 if self.tokens else 2
        self.step_bytes = self.input_dtype.itemsize * (1 if self.tokens else manifest.input_size)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{self.label}")
        self.batcher = Batcher(
            engine,
            self.pool,
            metrics,
            self.executor,
            label=self.label,
            max_batch=settings.max_batch_size,
            inline_max_steps=settings.inline_max_steps,
        )
        self._state_specs = {s.name: s for s in manifest.states}
        self.base_info = self._info(settings.max_chunk_length)
        metrics.state_bytes.set(self.pool.nbytes)

    def _info(self, max_chunk: int) -> pb.ModelInfo:
        m = self.manifest
        if self.tokens:
            in_spec = pb.TensorSpec(name=m.input_name, dtype=pb.DTYPE_INT64, shape=[-1])
        else:
            in_spec = pb.TensorSpec(
                name=m.input_name, dtype=pb.DTYPE_FLOAT32, shape=[-1, m.input_size]
            )
        meta = {"family": m.family, "onnx_form": m.onnx_form, "opset": str(m.opset)}
        meta["rnn_nodes"] = ",".join(f"{k}={v}" for k, v in self.engine.node_providers.items())
        for key in ("dataset", "metrics", "parity"):
            for k, v in getattr(m, key).items():
                meta[f"{key}.{k}"] = str(v)
        for key in ("input_scaling", "output_scaling"):
            sc = getattr(m, key)
            if sc is not None:
                meta[f"{key}.mean"] = ",".join(map(str, sc.mean))
                meta[f"{key}.std"] = ",".join(map(str, sc.std))
        return pb.ModelInfo(
            name=m.name,
            version=m.version,
            cell=m.cell,
            input_kind=_INPUT_KIND[m.input_kind],
            output_kind=_OUTPUT_KIND[m.output_kind],
            input=in_spec,
            output=pb.TensorSpec(
                name=m.output_name, dtype=pb.DTYPE_FLOAT32, shape=[-1, m.output_size]
            ),
            states=self.state_specs(),
            vocabulary=m.vocabulary or [],
            max_chunk_length=max_chunk,
            provider=self.engine.provider,
            metadata={k: v for k, v in meta.items() if v},
        )

    def state_specs(self) -> list[pb.TensorSpec]:
        return [
            pb.TensorSpec(name=s.name, dtype=dtype_to_proto(s.dtype), shape=s.shape)  # type: ignore[arg-type]
            for s in self.manifest.states
        ]

    def decode_chunk(self, tensor: pb.Tensor) -> npt.NDArray[np.generic]:
        """The chunk's steps as an array ``[T, features]`` or ``[T]``; INVALID_ARGUMENT with
        what to fix when the tensor does not fit the model."""
        m = self.manifest
        shape = tensor.shape  # each read of a proto field builds a wrapper: read once
        raw = tensor.raw_data
        if tensor.dtype == self.input_code and len(shape) == self.input_rank:
            steps = shape[0]
            if (
                0 < steps <= self.max_chunk
                and len(raw) == steps * self.step_bytes
                and (self.tokens or shape[1] == m.input_size)
            ):
                # The common case, checked without the general codec: the layout was checked
                # above. Small chunks are range- or NaN-checked in Python over a memoryview of
                # the bytes (under a microsecond for a few values, where each numpy reduction
                # costs 2-4 µs); larger ones in numpy.
                count = len(raw) // self.input_dtype.itemsize
                if self.tokens:
                    arr = np.frombuffer(raw, self.wire_dtype)
                    if count <= _PY_CHECK_MAX and _NATIVE_LE:
                        values = memoryview(raw).cast("q")
                        if min(values) >= 0 and max(values) < m.input_size:
                            return arr
                    elif arr.min() >= 0 and arr.max() < m.input_size:
                        return arr
                else:
                    arr = np.frombuffer(raw, self.wire_dtype).reshape(steps, m.input_size)
                    if not self.reject_nonfinite:
                        return arr
                    if count <= _PY_CHECK_MAX and _NATIVE_LE:
                        # float64 sum of float32 values cannot overflow; NaN and Inf propagate.
                        if math.isfinite(sum(memoryview(raw).cast("f"))):
                            return arr
                    else:
                        # The sum is the fast test; +Inf and -Inf together make it NaN (and an
                        # overflow makes it Inf): then the element-wise test decides, quietly.
                        with np.errstate(invalid="ignore", over="ignore"):
                            if np.isfinite(arr.sum()) or np.isfinite(arr).all():
                                return arr
        want = "int64 [T] token ids" if self.tokens else f"float32 [T, {m.input_size}]"
        try:
            arr = from_tensor(tensor)
        except TensorError as exc:
            raise invalid(f"inputs: {exc}; {self.label} takes {want}") from None
        if arr.dtype != self.input_dtype:
            raise invalid(f"inputs have dtype {arr.dtype.name}; {self.label} takes {want}")
        if arr.ndim != (1 if self.tokens else 2):
            raise invalid(
                f"inputs have shape {list(arr.shape)} (rank {arr.ndim}); {self.label} takes {want}"
            )
        steps = arr.shape[0]
        if steps == 0:
            raise invalid(f"inputs hold no steps; a chunk needs T >= 1 ({want})")
        if steps > self.max_chunk:
            raise invalid(
                f"chunk of {steps} steps is longer than the maximum of {self.max_chunk}; "
                "split it into several chunks"
            )
        if self.tokens:
            ids = arr.astype(np.int64, copy=False)
            bad = (ids < 0) | (ids >= m.input_size)
            if bad.any():
                i = int(np.argmax(bad))
                raise invalid(
                    f"token id {int(ids[i])} at step {i} is outside the vocabulary "
                    f"(ids 0..{m.input_size - 1})"
                )
        else:
            if arr.shape[1] != m.input_size:
                raise invalid(
                    f"inputs have {arr.shape[1]} features per step; {self.label} takes {want}"
                )
            if self.reject_nonfinite and not np.isfinite(arr).all():
                i = int(np.argmax(~np.isfinite(arr).all(axis=1)))
                raise invalid(
                    f"inputs hold NaN or Inf at step {i}; send finite values "
                    "(or run the server with nan_policy=pass)"
                )
        return arr

    def decode_state(self, tensors: Mapping[str, pb.Tensor]) -> dict[str, npt.NDArray[np.float32]]:
        """A full memory cell from a client; INVALID_ARGUMENT naming the tensor to fix."""
        names = set(self._state_specs)
        given = set(tensors)
        if given != names:
            missing, extra = sorted(names - given), sorted(given - names)
            parts = [f"missing {missing}"] if missing else []
            parts += [f"unknown {extra}"] if extra else []
            raise invalid(
                f"state of {self.label} needs exactly the tensors {sorted(names)}: "
                + ", ".join(parts)
            )
        out = {}
        for name, spec in self._state_specs.items():
            try:
                arr = from_tensor(tensors[name])
            except TensorError as exc:
                raise invalid(
                    f"state {name!r}: {exc}; {self.label} needs {spec.dtype} {spec.shape}"
                ) from None
            if arr.dtype != np.dtype(spec.dtype) or list(arr.shape) != spec.shape:
                raise invalid(
                    f"state {name!r} is {arr.dtype.name} {list(arr.shape)}; "
                    f"{self.label} needs {spec.dtype} {spec.shape}"
                )
            if not np.isfinite(arr).all():
                raise invalid(f"state {name!r} holds NaN or Inf")
            out[name] = arr.astype(np.float32, copy=False)
        return out

    def close(self) -> None:
        self.executor.shutdown(wait=False)
