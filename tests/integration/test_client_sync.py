"""The synchronous SDK against a real server: step and stream equal the whole sequence at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.client import (
    Client,
    InvalidInput,
    ModelNotFound,
    RnnserveError,
    SeqConflict,
    SessionLost,
    Snapshot,
)
from rnnserve.v1 import rnnserve_pb2 as pb

from tests.support.modelgen import reference_run

TOL = 1e-5


def _features(model: str, steps: int, seed: int, client: Client) -> np.ndarray:
    size = client.model(model).step_shape[0]
    return np.random.default_rng(seed).normal(size=(steps, size)).astype(np.float32)


@pytest.mark.parametrize("model", ["tiny-gru", "tiny-lstm"])
def test_step_chunks_and_single_steps_match_whole_sequence(
    server_thread: Any, model_repo: Path, model: str
) -> None:
    with Client(server_thread.address) as client:
        xs = _features(model, 23, seed=1, client=client)
        expected, _ = reference_run(model_repo / model / "1", xs)
        with client.session(model) as s:
            got = [s.step(xs[0])[np.newaxis], s.step(xs[1:9]), s.step(xs[9:10])]
            got += [s.step(x)[np.newaxis] for x in xs[10:]]
            assert s.next_seq == 23
        out = np.concatenate(got)
        assert out.shape == expected.shape
        assert np.max(np.abs(out - expected)) <= TOL


def test_stream_matches_whole_sequence(server_thread: Any, model_repo: Path) -> None:
    with Client(server_thread.address) as client:
        xs = _features("tiny-lstm", 30, seed=2, client=client)
        expected, state = reference_run(model_repo / "tiny-lstm" / "1", xs)
        with client.session("tiny-lstm") as s:
            pieces = [xs[0:5], xs[5], xs[6:20], xs[20:30]]
            outs = list(s.stream(iter(pieces)))
            assert [o.shape for o in outs] == [(5, 2), (2,), (14, 2), (10, 2)]
            got = np.concatenate([outs[0], outs[1][np.newaxis], outs[2], outs[3]])
            assert np.max(np.abs(got - expected)) <= TOL
            # The memory cell on the server is the reference's final state.
            for name, value in s.state().items():
                assert np.max(np.abs(value - state[name])) <= TOL


def test_text_model_takes_strings_and_ids(server_thread: Any, model_repo: Path) -> None:
    with Client(server_thread.address) as client:
        model = client.model("tiny-char")
        text = "hello good. deer "
        ids = np.array([model.token_ids[c] for c in text], dtype=np.int64)
        expected, _ = reference_run(model_repo / "tiny-char" / "1", ids)
        with client.session("tiny-char") as a, client.session(model) as b:
            from_text = a.step(text)
            from_ids = np.concatenate([b.step(ids[:4]), b.step(int(ids[4]))[np.newaxis]])
            from_ids = np.concatenate([from_ids, b.step(list(text[5:]))])
        assert from_text.shape == (len(text), len(model.vocabulary))
        assert np.max(np.abs(from_text - expected)) <= TOL
        assert np.max(np.abs(from_ids - expected)) <= TOL
        assert model.decode_tokens(ids) == text


def test_long_chunk_is_split_at_the_server_limit(server_thread: Any, model_repo: Path) -> None:
    with Client(server_thread.address) as client:
        model = client.model("tiny-gru")
        steps = model.max_chunk_length * 2 + 3
        xs = _features("tiny-gru", steps, seed=3, client=client)
        expected, _ = reference_run(model_repo / "tiny-gru" / "1", xs)
        with client.session(model) as s:
            out = s.step(xs)
            assert s.next_seq == steps
        assert np.max(np.abs(out - expected)) <= TOL


def test_reset_fork_snapshot_restore(server_thread: Any, model_repo: Path) -> None:
    with Client(server_thread.address) as client:
        xs = _features("tiny-gru", 12, seed=4, client=client)
        expected, _ = reference_run(model_repo / "tiny-gru" / "1", xs)
        with client.session("tiny-gru") as s:
            s.step(xs[:6])
            snap = Snapshot.from_bytes(s.snapshot().to_bytes())
            assert snap.next_seq == 6 and snap.model == "tiny-gru"
            with s.fork() as f:
                assert np.max(np.abs(f.step(xs[6:]) - expected[6:])) <= TOL
                assert f.next_seq == 12
            assert np.max(np.abs(s.step(xs[6:]) - expected[6:])) <= TOL
            # Rewind the same session to the snapshot: it continues identically again.
            s.restore(snap)
            assert s.next_seq == 6
            assert np.max(np.abs(s.step(xs[6:]) - expected[6:])) <= TOL
            # After a reset the memory cell is zeros again but seq numbering goes on.
            s.reset()
            assert np.max(np.abs(s.step(xs[:6]) - expected[:6])) <= TOL
            assert s.next_seq == 18
        with client.restore(snap) as r:
            assert np.max(np.abs(r.step(xs[6:]) - expected[6:])) <= TOL


def test_initial_state_is_used(server_thread: Any, model_repo: Path) -> None:
    with Client(server_thread.address) as client:
        model = client.model("tiny-lstm")
        rng = np.random.default_rng(5)
        state = {s.name: rng.normal(size=s.shape).astype(np.float32) for s in model.states}
        xs = _features("tiny-lstm", 7, seed=6, client=client)
        expected, _ = reference_run(model_repo / "tiny-lstm" / "1", xs, state)
        with client.session(model, initial_state=state) as s:
            assert np.max(np.abs(s.step(xs) - expected)) <= TOL
        with pytest.raises(InvalidInput, match=r"state tensors"):
            client.session(model, initial_state={"h": state["h"]})


def test_bad_inputs_are_refused_before_the_call(server_thread: Any) -> None:
    with Client(server_thread.address) as client, client.session("tiny-gru") as s:
        size = s.model.step_shape[0]
        with pytest.raises(
            InvalidInput, match=rf"float32 \[T, {size}\].*got shape \[4, {size + 1}\]"
        ):
            s.step(np.zeros((4, size + 1), np.float32))
        with pytest.raises(InvalidInput, match=r"got dtype complex128"):
            s.step(np.zeros((2, size), complex))
        with pytest.raises(InvalidInput, match=r"empty chunk"):
            s.step(np.zeros((0, size), np.float32))
        with pytest.raises(InvalidInput, match=r"NaN"):
            s.step(np.full((2, size), np.nan, np.float32))
        assert s.next_seq == 0
    with Client(server_thread.address) as client, client.session("tiny-char") as s:
        with pytest.raises(InvalidInput, match=r"'Z' \(position 2\) is not in its vocabulary"):
            s.step("abZ")
        with pytest.raises(InvalidInput, match=r"token id 99"):
            s.step([1, 99])
        with pytest.raises(InvalidInput, match=r"got dtype float64"):
            s.step([0.5, 1.5])


def test_server_errors_keep_their_status_code(server_thread: Any) -> None:
    with Client(server_thread.address) as client:
        with pytest.raises(ModelNotFound) as info:
            client.model("no-such-model")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert isinstance(info.value.__cause__, grpc.RpcError)
        s = client.session("tiny-gru")
        s.close()
        with pytest.raises(SessionLost, match="was closed") as lost:
            client.attach(s.id)  # the server no longer has it
        assert lost.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(RnnserveError, match="closed"):
            s.step(np.zeros(s.model.step_shape, np.float32))
        # Refusals the server makes keep its code and words.
        with pytest.raises(ModelNotFound, match="has no version '7'"):
            client.session("tiny-gru", version="7")
        empty = Snapshot(pb.SessionSnapshot(model="tiny-gru", version="1"))
        with pytest.raises(RnnserveError, match="missing") as refused:
            client.restore(empty)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_second_driver_of_one_session_is_a_conflict(server_thread: Any) -> None:
    with Client(server_thread.address) as client, client.session("tiny-gru") as s:
        x = np.zeros((3, *s.model.step_shape), np.float32)
        other = client.attach(s.id)  # a second handle that has not seen s's steps
        s.step(x)
        s.step(x)
        with pytest.raises(SeqConflict, match="another client") as info:
            other.step(x)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert s.step(x).shape == (3, s.model.output_size)  # the session itself goes on


def test_sessions_driven_from_many_threads(server_thread: Any, model_repo: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with Client(server_thread.address) as client:
        model = client.model("tiny-gru")
        rng = np.random.default_rng(7)
        xs = rng.normal(size=(8, 15, model.step_shape[0])).astype(np.float32)

        def drive(k: int) -> np.ndarray:
            with client.session(model) as s:
                return np.concatenate([s.step(xs[k, i : i + 5]) for i in range(0, 15, 5)])

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(drive, range(8)))
    for k, got in enumerate(results):
        expected, _ = reference_run(model_repo / "tiny-gru" / "1", xs[k])
        assert np.max(np.abs(got - expected)) <= TOL
