"""SlotPool: gather/scatter between the pool's [slots, ...] layout and the graph's, growth
without copying, packed slots and memory handed back."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
from rnnserve.manifest import StateSpec
from rnnserve.server.state import SlotPool


def _pool(batch_axis: int = 1, capacity: int = 2, max_slots: int = 1024) -> SlotPool:
    specs = [
        StateSpec("h", "h0", "hn", [2, 3], batch_axis),
        StateSpec("c", "c0", "cn", [2, 3], batch_axis),
    ]
    return SlotPool(specs, initial_capacity=capacity, max_slots=max_slots)


@dataclass
class Owner:
    slot: int = -1
    busy: bool = False
    value: float = 0.0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_growing_within_the_reservation_copies_nothing() -> None:
    pool = _pool(max_slots=100_000)
    arrays = pool.arrays["h"]
    slots = [pool.allocate() for _ in range(50_000)]
    assert pool.capacity == 100_000 and pool.in_use == 50_000
    assert pool.arrays["h"] is arrays  # the same array: nothing was copied
    assert slots == list(range(50_000))


def test_past_the_reservation_the_pool_doubles_and_keeps_values() -> None:
    pool = _pool(max_slots=2)
    a, b = pool.allocate(), pool.allocate()
    pool.write(a, {"h": np.full((2, 3), 1.0, np.float32), "c": np.full((2, 3), 2.0, np.float32)})
    c = pool.allocate()
    assert pool.capacity == 4 and pool.in_use == 3 and len({a, b, c}) == 3
    assert (pool.read(a)["h"] == 1.0).all() and (pool.read(a)["c"] == 2.0).all()
    assert (pool.read(c)["h"] == 0).all()


def test_released_slot_comes_back_zeroed() -> None:
    pool = _pool()
    a = pool.allocate()
    pool.allocate()
    pool.write(a, {"h": np.ones((2, 3), np.float32), "c": np.ones((2, 3), np.float32)})
    pool.release(a)
    again = pool.allocate()
    assert again == a and not pool.read(again)["h"].any()


def test_the_last_owner_moves_into_a_freed_slot() -> None:
    pool = _pool()
    owners = [Owner() for _ in range(4)]
    for i, o in enumerate(owners):
        o.slot = pool.allocate(o)
        pool.write(
            o.slot, {"h": np.full((2, 3), i, np.float32), "c": np.full((2, 3), -i, np.float32)}
        )
    pool.release(owners[1].slot)
    assert [owners[0].slot, owners[2].slot, owners[3].slot] == [0, 2, 1] and pool.in_use == 3
    assert (pool.read(1)["h"] == 3).all() and (pool.read(1)["c"] == -3).all()
    # A busy last owner stays where it is (its slot is in an engine run); the freed slot is a
    # hole the next allocation takes.
    owners[2].busy = True
    pool.release(owners[0].slot)
    assert owners[2].slot == 2
    assert pool.allocate() == 0


def test_slots_stay_packed_and_keep_their_state() -> None:
    """Random opens and closes, some owners busy: every owner's slot holds its own state and
    no two share one; the holes busy owners left are the next opens' slots, after which the
    used slots are exactly 0..in_use-1."""
    rng = random.Random(7)
    pool = _pool(max_slots=64)
    live: list[Owner] = []
    for step in range(3000):
        if live and (rng.random() < 0.45 or len(live) > 200):
            o = live.pop(rng.randrange(len(live)))
            pool.release(o.slot)
        else:
            o = Owner(value=float(step))
            o.slot = pool.allocate(o)
            value = np.full((2, 3), o.value, np.float32)
            pool.write(o.slot, {"h": value, "c": -value})
            live.append(o)
        for o in live:
            o.busy = rng.random() < 0.05
        slots = [o.slot for o in live]
        assert len(set(slots)) == len(slots) == pool.in_use
        if step % 50 == 0:
            for o in live:
                state = pool.read(o.slot)
                assert (state["h"] == o.value).all() and (state["c"] == -o.value).all()
    for o in live:
        o.busy = False
    holes = max(o.slot for o in live) + 1 - len(live)
    for _ in range(holes):
        o = Owner()
        o.slot = pool.allocate(o)
        live.append(o)
    assert sorted(o.slot for o in live) == list(range(len(live)))
    for o in live[: len(live) // 2]:
        pool.release(o.slot)
    rest = live[len(live) // 2 :]
    assert sorted(o.slot for o in rest) == list(range(len(rest)))


def test_gather_and_scatter_in_graph_layout() -> None:
    for axis in (0, 1, 2):
        pool = _pool(batch_axis=axis, capacity=8)
        slots = np.array([pool.allocate() for _ in range(5)])
        rng = np.random.default_rng(axis)
        values = {s: rng.normal(size=(2, 3)).astype(np.float32) for s in map(int, slots)}
        for s, v in values.items():
            pool.write(s, {"h": v, "c": -v})
        picked = slots[[3, 0, 4]]
        got = pool.gather(picked)
        assert got["h0"].flags.c_contiguous
        expect_h = np.stack([values[int(s)] for s in picked], axis=axis)
        assert np.array_equal(got["h0"], expect_h) and np.array_equal(got["c0"], -expect_h)
        # Scatter back new values for rows 0 and 2 only.
        new = {"hn": got["h0"] + 1, "cn": got["c0"] - 1}
        rows = np.array([0, 2])
        pool.scatter(picked[rows], new, rows)
        assert np.array_equal(pool.read(int(picked[0]))["h"], values[int(picked[0])] + 1)
        assert np.array_equal(pool.read(int(picked[1]))["h"], values[int(picked[1])])
        assert np.array_equal(pool.read(int(picked[2]))["c"], -values[int(picked[2])] - 1)
        pool.scatter(picked, new)
        assert np.array_equal(pool.read(int(picked[1]))["h"], values[int(picked[1])] + 1)


def test_zero_and_copy() -> None:
    pool = _pool()
    a, b = pool.allocate(), pool.allocate()
    pool.write(a, {"h": np.ones((2, 3), np.float32), "c": np.ones((2, 3), np.float32)})
    pool.copy(a, b)
    assert (pool.read(b)["c"] == 1).all()
    pool.zero(a)
    assert not pool.read(a)["h"].any() and (pool.read(b)["h"] == 1).all()


def test_memory_goes_back_when_sessions_end() -> None:
    """64 MiB of state written, then every session released: the pool's pages go back to the
    kernel (RSS falls by nearly all of it) in bounded steps."""
    specs = [StateSpec("h", "h0", "hn", [1, 128], 1)]
    pool = SlotPool(specs, max_slots=1 << 18)
    owners = [Owner() for _ in range(131_072)]  # 131,072 x 512 bytes = 64 MiB
    base = _rss()
    for o in owners:
        o.slot = pool.allocate(o)
        pool.arrays["h"][o.slot] = 1.0
    held = _rss()
    assert held - base > 60 * 2**20 and pool.nbytes == 64 * 2**20
    for o in owners:
        pool.release(o.slot)
    assert pool.in_use == 0 and pool.nbytes <= 2 * 2**20
    assert _rss() - base < 8 * 2**20
    # Reused pages read as zeros.
    again = Owner()
    again.slot = pool.allocate(again)
    assert not pool.read(again.slot)["h"].any()
