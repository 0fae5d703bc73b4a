"""The memory cells of a model version's sessions: one slot pool of numpy arrays per state.

Each state tensor (h, and c for an LSTM) is stored as ``[capacity, *per-session shape]``; a
session owns one slot index. A batch gathers its sessions' slots into the graph's layout (batch
at the manifest's ``batch_axis``) and scatters the new state back. The pool grows by doubling,
so an idle session costs its state bytes and nothing else. Not thread-safe: the event loop
owns it; engine runs get gathered copies.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from rnnserve.manifest import StateSpec

Array = npt.NDArray[np.float32]


class SlotPool:
    """Slots of per-session state for one model version."""

    def __init__(self, specs: list[StateSpec], initial_capacity: int = 16) -> None:
        self.specs = list(specs)
        self._arrays: dict[str, Array] = {
            s.name: np.zeros((initial_capacity, *s.shape), dtype=np.dtype(s.dtype))
            for s in self.specs
        }
        self._capacity = initial_capacity
        # Axis orders pool <-> graph layout, computed once (np.moveaxis costs microseconds).
        self._to_graph: dict[str, tuple[int, ...]] = {}
        self._to_pool: dict[str, tuple[int, ...]] = {}
        for spec in self.specs:
            order = list(range(1, len(spec.shape) + 1))
            order.insert(spec.batch_axis, 0)
            self._to_graph[spec.name] = tuple(order)
            self._to_pool[spec.name] = tuple(int(i) for i in np.argsort(order))
        # Lowest slots first, so a small pool's live sessions stay packed at the front.
        self._free = list(range(initial_capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        """Slots allocated (used and free)."""
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._capacity - len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool's arrays."""
        return sum(a.nbytes for a in self._arrays.values())

    def allocate(self) -> int:
        """A free slot holding zeros; doubles the pool when none is free."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        for a in self._arrays.values():
            a[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def _grow(self) -> None:
        old = self._capacity
        new = old * 2
        for name, a in self._arrays.items():
            grown = np.zeros((new, *a.shape[1:]), dtype=a.dtype)
            grown[:old] = a
            self._arrays[name] = grown
        self._free.extend(range(new - 1, old - 1, -1))
        self._capacity = new

    def gather(self, slots: npt.NDArray[np.intp]) -> dict[str, Array]:
        """The states of ``slots`` in graph layout (batch at each state's batch_axis), as
        contiguous copies the engine may read while the pool changes."""
        # One slot (a lone session): a basic slice, a third of the cost of fancy indexing.
        index: npt.NDArray[np.intp] | slice = slots
        if len(slots) == 1:
            first = int(slots[0])
            index = slice(first, first + 1)
        out = {}
        for s in self.specs:
            taken = self._arrays[s.name][index]
            out[s.input] = np.ascontiguousarray(taken.transpose(self._to_graph[s.name]))
        return out

    def scatter(
        self,
        slots: npt.NDArray[np.intp],
        new: dict[str, Array],
        rows: npt.NDArray[np.intp] | None = None,
    ) -> None:
        """Write the graph-layout outputs ``new`` (keyed by output name) into ``slots``, one
        slot per batch row; only the batch rows ``rows`` when given."""
        index: npt.NDArray[np.intp] | slice = slots
        if rows is None and len(slots) == 1:
            first = int(slots[0])
            index = slice(first, first + 1)
        for s in self.specs:
            values = new[s.output].transpose(self._to_pool[s.name])
            self._arrays[s.name][index] = values if rows is None else values[rows]

    @property
    def arrays(self) -> dict[str, Array]:
        """The pool by state name: ``[capacity, *per-session shape]`` arrays, slot-major. The
        dict stays the same object; growing replaces its arrays, so index it afresh each time."""
        return self._arrays

    def read(self, slot: int) -> dict[str, Array]:
        """Copies of one slot's state, by state name, each of its per-session shape."""
        return {name: a[slot].copy() for name, a in self._arrays.items()}

    def write(self, slot: int, values: dict[str, Array]) -> None:
        """Set one slot's state from per-session arrays keyed by state name (validated)."""
        for name, a in self._arrays.items():
            a[slot] = values[name]

    def zero(self, slot: int) -> None:
        for a in self._arrays.values():
            a[slot] = 0

    def copy(self, src: int, dst: int) -> None:
        for a in self._arrays.values():
            a[dst] = a[src]
