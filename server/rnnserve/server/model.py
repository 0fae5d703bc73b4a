"""A served model version: its manifest, engine, slot pool and batcher, and the checks that
turn a client's chunk or state into arrays the engine can take."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rnnserve.manifest import Manifest
from rnnserve.server import codec
from rnnserve.server.batcher import Batcher
from rnnserve.server.engine import Engine
from rnnserve.server.metrics import ModelMetrics
from rnnserve.server.settings import Settings
from rnnserve.server.state import SlotPool
from rnnserve.v1 import rnnserve_pb2 as pb


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
        self.pool = SlotPool(manifest.states, max_slots=settings.max_sessions)
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
        self.base_info = codec.model_info(self)
        metrics.state_bytes.set(self.pool.nbytes)

    def close(self) -> None:
        self.executor.shutdown(wait=False)
