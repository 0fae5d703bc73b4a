"""The memory cells of a model version's sessions: one slot pool of numpy arrays per state.

Each state tensor (h, and c for an LSTM) is stored as ``[slots, *per-session shape]``; a
session owns one slot index. A batch gathers its sessions' slots into the graph's layout (batch
at the manifest's ``batch_axis``) and scatters the new state back.

Memory: each array is a view of an anonymous memory map reserving ``max_slots`` slots up
front (the server passes its session capacity). Reserving costs address space only; the kernel
backs a page when a slot in it is first written, so the pool never copies itself to grow and
opening a session never stalls the event loop. Live slots are kept packed at the front: when a
session ends, the session in the last used slot moves into the freed one (the pool tells its
owner, ``SlotOwner.slot``, or hands the caller the row of a parked session, sessions.py),
unless that session has a chunk in an engine run (``busy``), in which case the freed slot waits
for the next open. Pages past the last used slot are handed
back to the kernel (``madvise(MADV_DONTNEED)``) a few MiB per release, so memory returns when
sessions end without a long pause. Not thread-safe: the event loop owns it; engine runs get
gathered copies.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import sys
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from rnnserve.manifest import StateSpec

Array = npt.NDArray[np.float32]

#: Slots reserved when the caller names no limit.
DEFAULT_MAX_SLOTS = 1 << 20
#: Pages past the last used slot are handed back once they hold more than this many bytes (or
#: an eighth of the used bytes, if more), at most ``GIVE_BACK_STEP`` bytes per release.
GIVE_BACK_SLACK = 1 << 20
GIVE_BACK_STEP = 4 << 20
_PAGE = mmap.PAGESIZE
#: Linux's MAP_NORESERVE (Python's mmap module does not export it): reserve address space
#: without counting it against the overcommit heuristic (it is counted when pages are used).
_NORESERVE = (
    0x4000
    if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64", "arm64", "i686")
    else 0
)


class SlotOwner(Protocol):
    """What holds a slot (a Session): the pool moves it to a lower slot while it is not
    ``busy`` (no chunk of it in an engine run) and updates ``slot``."""

    slot: int
    busy: bool


#: A slot's owner: a session record, or the row of a parked session (parked.py), which the
#: pool moves as it moves a record but cannot tell: ``release`` returns it to the caller.
Owner = SlotOwner | int


class _Pinned:
    """The owner of a slot allocated without one: it never moves."""

    slot = -1
    busy = True


_PINNED = _Pinned()


def reserve(nbytes: int) -> mmap.mmap:
    """An anonymous private mapping of ``nbytes`` (at least one page), zero-filled on demand."""
    size = max(_PAGE, -(-nbytes // _PAGE) * _PAGE)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    try:
        return mmap.mmap(-1, size, flags=flags | _NORESERVE)
    except OSError:
        if not _NORESERVE:
            raise
        return mmap.mmap(-1, size, flags=flags)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    if sys.platform != "linux":
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Hand the free pages inside the C heap back to the kernel. Memory freed in blocks
    between live ones (numpy's small arrays, the interpreter's large objects) stays with the
    process otherwise: after a million sessions ended, 70-80 MiB here, which this returns in
    about 6 ms (0.2 ms when there is nothing to return)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


#: Rows per block of an ``Objects`` column (8 KiB).
OBJECT_SHIFT = 10
OBJECT_BLOCK = 1 << OBJECT_SHIFT
OBJECT_MASK = OBJECT_BLOCK - 1


class Objects:
    """A growable column of Python objects (``append``, ``pop``, indexing by row), kept in
    blocks of OBJECT_BLOCK rows: numpy object arrays, which the garbage collector does not
    walk. It visits every item of a list at each full collection, about 25-60 ms for a list
    of a million; what the column holds must not be part of a reference cycle."""

    def __init__(self) -> None:
        self._blocks: list[npt.NDArray[np.object_]] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, row: int) -> Any:
        return self._blocks[row >> OBJECT_SHIFT][row & OBJECT_MASK]

    def __setitem__(self, row: int, value: object) -> None:
        self._blocks[row >> OBJECT_SHIFT][row & OBJECT_MASK] = value

    def append(self, value: object) -> None:
        row = self._len
        if row >> OBJECT_SHIFT == len(self._blocks):
            self._blocks.append(np.full(OBJECT_BLOCK, None, object))
        self._blocks[row >> OBJECT_SHIFT][row & OBJECT_MASK] = value
        self._len = row + 1

    def extend(self, values: list[Any]) -> None:
        """``append`` of each of ``values``, a block at a time."""
        row, done = self._len, 0
        while done < len(values):
            if row >> OBJECT_SHIFT == len(self._blocks):
                self._blocks.append(np.full(OBJECT_BLOCK, None, object))
            at = row & OBJECT_MASK
            n = min(OBJECT_BLOCK - at, len(values) - done)
            block = self._blocks[row >> OBJECT_SHIFT]
            for i in range(n):  # one by one: numpy would unpack a tuple in a slice's list
                block[at + i] = values[done + i]
            row += n
            done += n
        self._len = row

    def pop(self) -> Any:
        """The last row's object; the row is dropped, and blocks past the one after the last
        row left."""
        row = self._len = self._len - 1
        block = self._blocks[row >> OBJECT_SHIFT]
        value = block[row & OBJECT_MASK]
        block[row & OBJECT_MASK] = None
        del self._blocks[((row + OBJECT_MASK) >> OBJECT_SHIFT) + 1 :]
        return value

    def take(self, rows: npt.NDArray[np.intp]) -> list[Any]:
        """The objects of ``rows``."""
        return [self[int(r)] for r in rows]


class SlotPool:
    """Slots of per-session state for one model version."""

    def __init__(
        self,
        specs: list[StateSpec],
        initial_capacity: int = 16,
        max_slots: int = DEFAULT_MAX_SLOTS,
    ) -> None:
        self.specs = list(specs)
        self._row_bytes = {
            s.name: int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
            for s in self.specs
        }
        self._row_total = max(1, sum(self._row_bytes.values()))
        self._maps: dict[str, mmap.mmap] = {}
        self._arrays: dict[str, Array] = {}
        self._max = 0
        self._map(max(max_slots, initial_capacity, 1))
        # Axis orders pool <-> graph layout, computed once (np.moveaxis costs microseconds).
        self._to_graph: dict[str, tuple[int, ...]] = {}
        self._to_pool: dict[str, tuple[int, ...]] = {}
        #: Graph-layout shape of one session's state (batch axis of length 1).
        self._one: dict[str, tuple[int, ...]] = {}
        for spec in self.specs:
            one = list(spec.shape)
            one.insert(spec.batch_axis, 1)
            self._one[spec.name] = tuple(one)
            order = list(range(1, len(spec.shape) + 1))
            order.insert(spec.batch_axis, 0)
            self._to_graph[spec.name] = tuple(order)
            self._to_pool[spec.name] = tuple(int(i) for i in np.argsort(order))
        #: Each slot's owner (None: a hole), up to the last used slot: every slot past the
        #: list's end is free. Not a list, which each full garbage collection would walk; an
        #: owner leaves it when its session ends, so no reference cycle stays in it.
        self._owners = Objects()  # Owner | None
        #: Holes: free slots before the last used one (left when the owner of the last slot
        #: could not move into them); entries past the list's end are stale and skipped.
        self._holes: list[int] = []
        self._in_use = 0
        #: Slots whose pages may be resident (written since their pages were last handed back).
        self._touched = 0

    def _map(self, slots: int) -> None:
        """(Re)reserve ``slots`` slots, keeping the used ones (a copy: only past max_slots)."""
        used = self._touched if self._maps else 0
        for s in self.specs:
            mm = reserve(slots * self._row_bytes[s.name])
            count = slots * self._row_bytes[s.name] // np.dtype(s.dtype).itemsize
            flat: Array = np.frombuffer(mm, dtype=np.dtype(s.dtype), count=count)
            arr = flat.reshape(slots, *s.shape)
            if used:
                arr[:used] = self._arrays[s.name][:used]
            self._maps[s.name] = mm
            self._arrays[s.name] = arr
        self._max = slots

    @property
    def capacity(self) -> int:
        """Slots the pool holds without growing (its reservation)."""
        return self._max

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's arrays that may be resident (pages written and not handed back)."""
        return sum(-(-self._touched * row // _PAGE) * _PAGE for row in self._row_bytes.values())

    def allocate(self, owner: SlotOwner | None = None) -> int:
        """A free slot holding zeros: a hole if there is one, else the one after the last used
        slot. With ``owner`` the pool may later move it to a lower slot (see ``release``);
        without, the slot never moves."""
        owners = self._owners
        slot = -1
        holes = self._holes
        while holes:
            s = holes.pop()
            if s < len(owners) and owners[s] is None:
                slot = s
                break
        if slot < 0:
            slot = len(owners)
            if slot == self._max:
                self._map(2 * self._max)  # past the reservation: the one growth that copies
            owners.append(None)
            if slot >= self._touched:
                self._touched = slot + 1
        owners[slot] = _PINNED if owner is None else owner
        self._in_use += 1
        for a in self._arrays.values():
            a[slot] = 0
        return slot

    def hand(self, slot: int, owner: Owner) -> None:
        """``slot``'s owner is ``owner`` from now on (a session parked or taken back)."""
        self._owners[slot] = owner

    def release(self, slot: int) -> int | None:
        """Free ``slot``. The owner of the last used slot moves into it unless busy, so the
        used slots stay packed; then some of the pages past them go back to the kernel.
        Returns the parked row that moved into ``slot``, if one did: its caller records the
        move (a record's ``slot`` the pool sets itself)."""
        owners = self._owners
        owners[slot] = None
        self._in_use -= 1
        last = len(owners) - 1
        moved = None
        if slot < last:
            mover = owners[last]
            if mover is not None and (isinstance(mover, int) or not mover.busy):
                for a in self._arrays.values():
                    a[slot] = a[last]
                owners[slot] = mover
                owners[last] = None
                if isinstance(mover, int):
                    moved = mover
                else:
                    mover.slot = slot
            else:
                self._holes.append(slot)
        while owners and owners[len(owners) - 1] is None:
            owners.pop()
        if len(self._holes) > 64 and len(self._holes) > 2 * (len(owners) - self._in_use):
            self._holes = [s for s in set(self._holes) if s < len(owners) and owners[s] is None]
            self._holes.sort(reverse=True)
        self._give_back()
        return moved

    def _give_back(self) -> None:
        """Hand pages past the used slots back to the kernel once more than GIVE_BACK_SLACK
        bytes (or an eighth of the used bytes) lie there: at most GIVE_BACK_STEP bytes per
        call, so a mass close never pauses the loop for long."""
        used = len(self._owners)
        touched = self._touched
        row = self._row_total
        if (touched - used) * row <= max(GIVE_BACK_SLACK, used * row // 8):
            return
        keep = max(used, touched - max(1, GIVE_BACK_STEP // row))
        for name, size in self._row_bytes.items():
            start = -(-keep * size // _PAGE) * _PAGE
            end = -(-touched * size // _PAGE) * _PAGE
            if start < end:
                self._maps[name].madvise(mmap.MADV_DONTNEED, start, end - start)
        self._touched = keep

    def gather(self, slots: npt.NDArray[np.intp]) -> dict[str, Array]:
        """The states of ``slots`` in graph layout (batch at each state's batch_axis), as
        contiguous copies the engine may read while the pool changes (one slot: views of it,
        see ``gather_one``)."""
        if len(slots) == 1:
            return self.gather_one(int(slots[0]))
        out = {}
        for s in self.specs:
            taken = self._arrays[s.name][slots]
            out[s.input] = np.ascontiguousarray(taken.transpose(self._to_graph[s.name]))
        return out

    def gather_one(self, slot: int) -> dict[str, Array]:
        """``gather`` of one slot, as views of it in graph layout (the batch axis has length 1,
        so each is contiguous): the engine copies them into its bound buffers. They hold
        while the slot's owner is busy (the pool moves no busy owner); if the owner ends
        meanwhile, another session may move into the slot, and the run's result is dropped
        (the batcher stores no state for an ended session)."""
        out = {}
        arrays, one = self._arrays, self._one
        for s in self.specs:
            out[s.input] = arrays[s.name][slot].reshape(one[s.name])
        return out

    def scatter_one(self, slot: int, new: dict[str, Array]) -> None:
        """``scatter`` of a batch of one into ``slot``."""
        arrays = self._arrays
        for s in self.specs:
            arrays[s.name][slot] = new[s.output].reshape(s.shape)

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
        dict stays the same object; growing past the reservation replaces its arrays, so index
        it afresh each time."""
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
