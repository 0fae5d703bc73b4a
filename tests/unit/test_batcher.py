"""Batcher over a real engine and slot pool: mixed-length batches, one chunk per session per
batch, seq checks at batch time, grouping by length for a model without sequence_lens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from rnnserve.server import codec
from rnnserve.server.errors import ServingError
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import SessionManager
from rnnserve.server.settings import Settings
from rnnserve.server.work import FrameWork, Work
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import from_tensor

from tests.support.modelgen import reference_run, write_model


async def _served(tmp_path: Path, inline_max_steps: int, **model_args):
    folder = write_model(tmp_path, "m", **model_args)
    metrics = Metrics(CollectorRegistry())
    settings = Settings(models=tmp_path, inline_max_steps=inline_max_steps, metrics_port=-1)
    model = await asyncio.to_thread(Repository(settings, metrics).load_version, folder)
    return folder, model, SessionManager(metrics, 60.0, 100)


class _Sink:
    """A chunk's sink that resolves a future with its StepResponse or error."""

    def __init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    def step_done(self, work: Work, outputs: np.ndarray, state) -> None:
        reply = codec.step_response(pb.StepResponse(), work.session.id, work.seq, outputs, state)
        self.future.set_result(reply)

    def step_failed(self, work: Work, err: ServingError) -> None:
        self.future.set_result(err)


def _submit(
    model, session, seq: int, x: np.ndarray, digest=b"", want_state: bool = False
) -> asyncio.Future:
    sink = _Sink()
    model.batcher.submit(Work(session, seq, x, want_state, sink, digest))
    return sink.future


def _runs(model) -> int:
    """Engine runs so far, from the batch-size histogram's buckets."""
    return model.metrics.batch_size.count


def _out(reply: pb.StepResponse) -> np.ndarray:
    return np.frombuffer(reply.outputs.raw_data, np.float32).reshape(tuple(reply.outputs.shape))


@pytest.mark.parametrize("inline_max_steps", [1000, 0], ids=["inline", "worker-thread"])
async def test_mixed_lengths_share_one_batch(tmp_path: Path, inline_max_steps: int):
    folder, model, sessions = await _served(tmp_path, inline_max_steps, cell="lstm")
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (1, 5, 2, 7)]
    opened = [sessions.open(model) for _ in xs]
    # Two chunks per session submitted before the loop runs: the first of each go in one
    # batch, the second ones (same sessions) in the next.
    futs = [_submit(model, s, 0, x[:1]) for s, x in zip(opened, xs, strict=True)]
    futs += [_submit(model, s, 1, x[1:]) for s, x in zip(opened, xs, strict=True) if len(x) > 1]
    replies = await asyncio.gather(*futs)
    batches = model.metrics.batch_size.sum
    assert (
        model.metrics.batch_size._count.get()
        if hasattr(model.metrics.batch_size, "_count")
        else True
    )
    assert batches == 4 + 3
    for s, x in zip(opened, xs, strict=True):
        mine = sorted((r for r in replies if r.session_id == s.id), key=lambda r: r.seq)
        got = np.concatenate([_out(r) for r in mine])
        want, _ = reference_run(folder, x)
        assert np.max(np.abs(got - want)) <= 1e-5
        assert s.next_seq == len(x)


async def test_seq_checked_when_taken(tmp_path: Path):
    _, model, sessions = await _served(tmp_path, 1000)
    s = sessions.open(model)
    x = np.ones((2, 3), np.float32)
    first, dup, gap = _submit(model, s, 0, x), _submit(model, s, 0, x), _submit(model, s, 9, x)
    a, b, c = await asyncio.gather(first, dup, gap)
    assert b == a  # the cached reply, not a second application
    assert isinstance(c, ServingError) and c.next_seq == 2
    assert model.metrics.chunk_length.sum == 2  # rnnserve_steps_total


async def test_without_sequence_lens_batches_one_length_at_a_time(tmp_path: Path):
    folder, model, sessions = await _served(tmp_path, 1000, sequence_lens=False)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (2, 3, 2, 3, 2)]
    opened = [sessions.open(model) for _ in xs]
    replies = await asyncio.gather(
        *(_submit(model, s, 0, x) for s, x in zip(opened, xs, strict=True))
    )
    # The first chunk ran as it arrived (the batcher was idle); the other four went in two
    # batches, one per length.
    assert _runs(model) == 3 and model.metrics.batch_size.sum == 5
    for x, r in zip(xs, replies, strict=True):
        want, _ = reference_run(folder, x)
        assert np.max(np.abs(_out(r) - want)) <= 1e-5


@pytest.mark.parametrize("steps", [1, 3, 40, 200], ids=lambda n: f"T={n}")
async def test_decode_chunk_checks_small_and_large_chunks_alike(tmp_path: Path, steps: int):
    """Small chunks are checked in Python, large ones in numpy: both accept and refuse the
    same inputs with the same message."""
    from rnnserve.wire import to_tensor

    _, feats, _ = await _served(tmp_path / "f", 0, input_size=3)
    _, toks, _ = await _served(tmp_path / "t", 0, input_kind="tokens", input_size=20)
    x = np.random.default_rng(steps).normal(size=(steps, 3)).astype(np.float32)
    np.testing.assert_array_equal(codec.decode_chunk(feats, to_tensor(x)), x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[-1, 1] = bad
        with pytest.raises(ServingError, match=f"NaN or Inf at step {steps - 1}"):
            codec.decode_chunk(feats, to_tensor(y))
    y = x.copy()
    y[0, 0], y[-1, 2] = np.inf, -np.inf  # sums to NaN: still refused
    with pytest.raises(ServingError, match="NaN or Inf at step 0"):
        codec.decode_chunk(feats, to_tensor(y))
    ids = np.arange(steps, dtype=np.int64) % 20
    np.testing.assert_array_equal(codec.decode_chunk(toks, to_tensor(ids)), ids)
    for bad in (-1, 20, 2**62):
        bad_ids = ids.copy()
        bad_ids[-1] = bad
        with pytest.raises(ServingError, match=f"token id {bad} at step {steps - 1} is outside"):
            codec.decode_chunk(toks, to_tensor(bad_ids))


@pytest.mark.parametrize("steps", [2, 300], ids=["kept", "digested-at-once"])
async def test_applied_chunk_digest_matches_the_wire_definition(tmp_path: Path, steps: int):
    """A chunk handed over as its tensor is digested lazily (small) or at once (large); either
    way the session's digest is rnnserve.wire.chunk_digest and guards retries."""
    from rnnserve.wire import chunk_digest, to_tensor

    _, model, sessions = await _served(tmp_path, 1000)
    s = sessions.open(model)
    t = to_tensor(np.ones((steps, 3), np.float32))
    reply = await _submit(model, s, 0, codec.decode_chunk(model, t), t)
    assert s.last_digest == chunk_digest(t)
    np.testing.assert_array_equal(s.check_seq(0, t), _out(reply))
    np.testing.assert_array_equal(s.check_seq(0, chunk_digest(t)), s.check_seq(0, t))
    other = to_tensor(np.zeros((steps, 3), np.float32))
    with pytest.raises(ServingError, match="already applied with other inputs"):
        s.check_seq(0, other)


@pytest.mark.parametrize("inline_max_steps", [1000, 0], ids=["inline", "worker-thread"])
async def test_low_load_runs_at_once_and_a_busy_tick_batches(tmp_path: Path, inline_max_steps):
    _, model, sessions = await _served(tmp_path, inline_max_steps)
    opened = [sessions.open(model) for _ in range(4)]
    x = np.ones((1, 3), np.float32)
    inline = inline_max_steps > 0

    # Idle: a lone chunk runs as it is submitted (on the loop, or started on the worker).
    first = _submit(model, opened[0], 0, x)
    assert first.done() == inline and _runs(model) == int(inline)
    await first
    await asyncio.sleep(0)  # the next tick

    # Four chunks in one tick: the first runs at once, the other three wait for the next tick
    # and share one batch; with that, the batcher stays batching.
    futs = [_submit(model, s, 1 if s is opened[0] else 0, x) for s in opened]
    await asyncio.gather(*futs)
    assert _runs(model) == 3 and model.metrics.batch_size.sum == 5
    futs = [_submit(model, s, s.next_seq, x) for s in opened]
    assert not any(f.done() for f in futs)
    await asyncio.gather(*futs)
    assert _runs(model) == 4 and model.metrics.batch_size.sum == 9

    # A tick with one chunk: back to running chunks as they arrive.
    await _submit(model, opened[0], opened[0].next_seq, x)
    await asyncio.sleep(0)
    later = _submit(model, opened[1], opened[1].next_seq, x)
    assert later.done() == inline
    await later
    assert _runs(model) == 6


async def test_a_lone_chunk_that_cannot_run_at_once_is_answered_as_in_a_batch(tmp_path: Path):
    """At low load a chunk runs as it arrives; a retry, a seq gap, an ended session and a
    chunk too long to run on the loop take the batch path and get its answers."""
    from rnnserve.server.sessions import CLOSED

    folder, model, sessions = await _served(tmp_path, 4)
    s, gone = sessions.open(model), sessions.open(model)
    x = np.ones((2, 3), np.float32)
    applied = await _submit(model, s, 0, x)
    await asyncio.sleep(0)
    retry = _submit(model, s, 0, x)
    assert retry.done() and retry.result() == applied and _runs(model) == 1
    await asyncio.sleep(0)
    gap = _submit(model, s, 5, x)
    assert gap.done() and isinstance(gap.result(), ServingError)
    assert gap.result().next_seq == 2
    await asyncio.sleep(0)
    sessions.end(gone, CLOSED)
    ended = await _submit(model, gone, 0, x)
    assert isinstance(ended, ServingError) and "closed" in str(ended)
    await asyncio.sleep(0)
    long = np.random.default_rng(2).normal(size=(9, 3)).astype(np.float32)  # > 4: the worker
    reply = await _submit(model, s, 2, long)
    assert _runs(model) == 2 and reply.seq == 2 and reply.next_seq == 11
    want, _ = reference_run(folder, np.concatenate([x, long]))
    assert np.max(np.abs(_out(reply) - want[2:])) <= 1e-5
    assert not s.busy and s.next_seq == 11


def _state(model, session) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in model.pool.read(session.slot).items()}


@pytest.mark.parametrize("inline_max_steps", [1000, 0], ids=["inline", "worker-thread"])
@pytest.mark.parametrize("where", ["engine", "reply"])
@pytest.mark.parametrize("count", [1, 5], ids=["alone", "batch"])
async def test_a_failing_run_answers_every_chunk_and_moves_no_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline_max_steps: int, where: str, count: int
):
    # The engine raising, or building a reply raising after the run: every chunk of that run
    # gets an error, no session's state or seq moves, none stays busy; the next run works.
    from rnnserve.server.results import Results

    _, model, sessions = await _served(tmp_path, inline_max_steps)
    opened = [sessions.open(model) for _ in range(count)]
    x = np.ones((2, 3), np.float32)
    await asyncio.gather(*[_submit(model, s, 0, x) for s in opened])
    before = [_state(model, s) for s in opened]
    calls = {"n": 0}
    want_state = where == "reply"  # the replies' states are built after the run

    def boom(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("injected")

    if where == "engine":
        monkeypatch.setattr(model.engine, "run", boom)
    else:
        monkeypatch.setattr(Results, "wanted_states", boom)
    futs = [_submit(model, s, 2, x, want_state=want_state) for s in opened]
    results = await asyncio.wait_for(asyncio.gather(*futs), 10)
    assert calls["n"] >= 1
    for s, result, old in zip(opened, results, before, strict=True):
        assert isinstance(result, ServingError) and result.code.name == "INTERNAL"
        assert not s.busy and s.next_seq == 2
        for name, value in _state(model, s).items():
            np.testing.assert_array_equal(value, old[name])
    monkeypatch.undo()
    replies = await asyncio.wait_for(asyncio.gather(*[_submit(model, s, 2, x) for s in opened]), 10)
    assert all(r.next_seq == 4 for r in replies)


@pytest.mark.parametrize("inline_max_steps", [1000, 0], ids=["lone-path", "worker-thread"])
async def test_a_lone_chunk_answers_its_outputs_and_state_as_a_batch_would(
    tmp_path: Path, inline_max_steps: int
):
    # At low load a chunk runs alone (inline: _run_lone; else the batch route on the worker
    # thread): outputs, the state it returns, the stored state and its retry all match the
    # model run straight.
    folder, model, sessions = await _served(tmp_path, inline_max_steps)
    s = sessions.open(model)
    x = np.random.default_rng(6).normal(size=(4, 3)).astype(np.float32)
    first = await _submit(model, s, 0, x[:2])
    second = await _submit(model, s, 2, x[2:], want_state=True)
    want, state = reference_run(folder, x)
    np.testing.assert_allclose(_out(first), want[:2], atol=1e-5)
    np.testing.assert_allclose(_out(second), want[2:], atol=1e-5)
    for name, value in state.items():
        np.testing.assert_allclose(from_tensor(second.state[name]), value, atol=1e-5)
        np.testing.assert_allclose(model.pool.read(s.slot)[name], value, atol=1e-5)
    retry = await _submit(model, s, 2, x[2:])
    np.testing.assert_array_equal(_out(retry), _out(second))
    assert s.next_seq == 4 and not s.busy and _runs(model) == 2


class _FrameSink:
    """A frame's sink that records each entry's answer."""

    def __init__(self, n: int, steps: int, width: int) -> None:
        self.outputs = np.zeros((n, steps, width), np.float32)
        self.errors: dict[int, ServingError] = {}
        self.answered = 0

    def entries_done(self, rows, outputs) -> None:
        self.outputs[rows] = outputs
        self.answered += len(rows)

    def entry_done(self, row, outputs) -> None:
        self.outputs[row] = outputs
        self.answered += 1

    def entry_failed(self, row, err) -> None:
        self.errors[row] = err
        self.answered += 1


def _frame(sink, sessions, seqs, x) -> FrameWork:
    return FrameWork(sink, list(sessions), list(seqs), list(range(len(sessions))), x, 0.0)


@pytest.mark.parametrize("inline_max_steps", [1000, 0], ids=["inline", "worker-thread"])
async def test_a_frame_runs_as_one_batch_and_each_entry_stands_alone(
    tmp_path: Path, inline_max_steps: int
):
    """A frame's entries run in one engine run (outputs as each session alone would get), a
    session twice in a frame applies in order over two runs, and bad entries are answered
    without touching the others: an ended session, a seq gap, a retry of the last chunk."""
    from rnnserve.server.sessions import CLOSED

    folder, model, sessions = await _served(tmp_path, inline_max_steps)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 2, 3)).astype(np.float32)
    x[5] = x[1]  # a true retry: the same chunk again
    s = [sessions.open(model) for _ in range(4)]
    sink = _FrameSink(6, 2, model.manifest.output_size)
    # Entries: s0, s1, s2, s0 again (its next chunk), s3 at a gap, s1 at seq 0 again (a
    # duplicate within the frame: applied once, then its retry answered from the cache).
    model.batcher.submit(_frame(sink, [s[0], s[1], s[2], s[0], s[3], s[1]], [0, 0, 0, 2, 7, 0], x))
    for _ in range(50):
        if sink.answered == 6:
            break
        await asyncio.sleep(0.01)
    assert sink.answered == 6
    assert set(sink.errors) == {4} and sink.errors[4].next_seq == 0
    for sess, steps in [(s[0], 4), (s[1], 2), (s[2], 2)]:
        assert sess.next_seq == steps and not sess.busy
    want0, _ = reference_run(folder, np.concatenate([x[0], x[3]]))
    np.testing.assert_allclose(sink.outputs[0], want0[:2], atol=1e-5)
    np.testing.assert_allclose(sink.outputs[3], want0[2:], atol=1e-5)
    for i in (1, 2):
        want, _ = reference_run(folder, x[i])
        np.testing.assert_allclose(sink.outputs[i], want, atol=1e-5)
    np.testing.assert_array_equal(sink.outputs[5], sink.outputs[1])  # the cached outputs
    # An ended session's entry fails alone.
    sessions.end(s[2], CLOSED)
    again = _FrameSink(2, 2, model.manifest.output_size)
    model.batcher.submit(_frame(again, [s[2], s[1]], [2, 2], x[:2]))
    for _ in range(50):
        if again.answered == 2:
            break
        await asyncio.sleep(0.01)
    assert set(again.errors) == {0} and again.errors[0].code.name == "NOT_FOUND"
    assert s[1].next_seq == 4


async def test_a_session_twice_at_one_seq_in_a_frame_is_applied_once(tmp_path: Path):
    # Every entry is at its session's next seq, so only the session's second appearance
    # tells the batcher not to run the frame whole: s0's second entry is a retry of its first
    # (answered from the cache), s1's reuses the seq with other inputs (refused).
    folder, model, sessions = await _served(tmp_path, 1000)
    s = [sessions.open(model) for _ in range(2)]
    x = np.random.default_rng(5).normal(size=(4, 2, 3)).astype(np.float32)
    x[2] = x[0]
    sink = _FrameSink(4, 2, model.manifest.output_size)
    model.batcher.submit(_frame(sink, [s[0], s[1], s[0], s[1]], [0, 0, 0, 0], x))
    for _ in range(50):
        if sink.answered == 4:
            break
        await asyncio.sleep(0.01)
    assert sink.answered == 4
    assert set(sink.errors) == {3} and sink.errors[3].code.name == "FAILED_PRECONDITION"
    assert s[0].next_seq == 2 and s[1].next_seq == 2
    for row, sess in ((0, s[0]), (1, s[1])):
        want, state = reference_run(folder, x[row])
        np.testing.assert_allclose(sink.outputs[row], want, atol=1e-5)
        for name, value in model.pool.read(sess.slot).items():
            np.testing.assert_allclose(value, state[name], atol=1e-5)
    np.testing.assert_array_equal(sink.outputs[2], sink.outputs[0])


async def test_a_frame_larger_than_max_batch_runs_in_parts(tmp_path: Path):
    folder, model, sessions = await _served(tmp_path, 1000)
    model.batcher.max_batch = 3
    s = [sessions.open(model) for _ in range(8)]
    x = np.random.default_rng(4).normal(size=(8, 1, 3)).astype(np.float32)
    sink = _FrameSink(8, 1, model.manifest.output_size)
    model.batcher.submit(_frame(sink, s, [0] * 8, x))
    for _ in range(50):
        if sink.answered == 8:
            break
        await asyncio.sleep(0.01)
    assert sink.answered == 8 and not sink.errors
    assert _runs(model) == 3 and model.metrics.batch_size.sum == 8
    for i in range(8):
        want, _ = reference_run(folder, x[i])
        np.testing.assert_allclose(sink.outputs[i], want, atol=1e-5)
