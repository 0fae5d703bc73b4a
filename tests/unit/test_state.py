"""SlotPool: gather/scatter between the pool's [capacity, ...] layout and the graph's."""

from __future__ import annotations

import numpy as np
from rnnserve.manifest import StateSpec
from rnnserve.server.state import SlotPool


def _pool(batch_axis: int = 1, capacity: int = 2) -> SlotPool:
    specs = [
        StateSpec("h", "h0", "hn", [2, 3], batch_axis),
        StateSpec("c", "c0", "cn", [2, 3], batch_axis),
    ]
    return SlotPool(specs, initial_capacity=capacity)


def test_allocate_grows_by_doubling_and_keeps_values():
    pool = _pool(capacity=2)
    a, b = pool.allocate(), pool.allocate()
    pool.write(a, {"h": np.full((2, 3), 1.0, np.float32), "c": np.full((2, 3), 2.0, np.float32)})
    c = pool.allocate()
    assert pool.capacity == 4 and pool.in_use == 3 and len({a, b, c}) == 3
    assert (pool.read(a)["h"] == 1.0).all() and (pool.read(a)["c"] == 2.0).all()
    assert (pool.read(c)["h"] == 0).all()
    assert pool.nbytes == 2 * 4 * 2 * 3 * 4


def test_released_slot_comes_back_zeroed():
    pool = _pool()
    a = pool.allocate()
    pool.write(a, {"h": np.ones((2, 3), np.float32), "c": np.ones((2, 3), np.float32)})
    pool.release(a)
    again = pool.allocate()
    assert again == a and not pool.read(again)["h"].any()


def test_gather_and_scatter_in_graph_layout():
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


def test_zero_and_copy():
    pool = _pool()
    a, b = pool.allocate(), pool.allocate()
    pool.write(a, {"h": np.ones((2, 3), np.float32), "c": np.ones((2, 3), np.float32)})
    pool.copy(a, b)
    assert (pool.read(b)["c"] == 1).all()
    pool.zero(a)
    assert not pool.read(a)["h"].any() and (pool.read(b)["h"] == 1).all()
