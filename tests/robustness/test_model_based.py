"""Model-based test of the session semantics under concurrency: rounds of random operations on
many sessions (unary steps, single steps and frames on one shared Stream, retries, stale seqs,
reset, fork, close, snapshot and restore), all of a round in flight at once so they share
engine runs, each session in at most one operation per round. A reference model of every
session (its memory cell, run straight through onnxruntime at batch 1, its seq and its last
chunk) says what each answer must be; any step applied twice, lost, run on the wrong state or
answered from the wrong cache shows as a wrong output or seq."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import from_tensor, to_tensor

from tests.support.modelgen import Reference
from tests.support.raw import next_seq_of

MODELS = ("tiny-gru", "tiny-lstm")  # the same input and output widths: frames may mix them
TOL = 1e-5
ROUNDS = 40
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
#: A chunk refused this way was not applied and may be sent again (the SDK does): the session
#: left the server's memory while the chunk waited, for the store.
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


@dataclass
class Tracked:
    """What a session must be: its model, memory cell, next seq and last applied chunk."""

    sid: str
    model: str
    state: dict[str, np.ndarray]
    next_seq: int = 0
    #: (seq, inputs, outputs) of the last applied chunk; None when a retry has no defined
    #: answer here (never stepped, or just forked or reset).
    last: tuple[int, np.ndarray, np.ndarray] | None = None
    #: A snapshot taken earlier and what the session was then.
    saved: tuple[pb.SessionSnapshot, dict[str, np.ndarray], int, Any] | None = field(default=None)


@dataclass
class Round:
    """One round's operations: unary tasks, and the requests of the shared Stream with the
    check of each reply (by request id)."""

    tasks: list[Any] = field(default_factory=list)
    #: The requests of each replica's Stream (by its index in Harness.stubs).
    streams: dict[int, list[pb.StreamRequest]] = field(default_factory=dict)
    checks: dict[int, Any] = field(default_factory=dict)
    #: Run once every answer of the round is in.
    after: list[Any] = field(default_factory=list)


class As:
    """A stub whose every call carries ``metadata`` (a principal's token)."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, method: str) -> Any:
        call = getattr(self._stub, method)
        return lambda request, **kw: call(request, metadata=self._metadata, **kw)


class Harness:
    """Plans and checks the rounds. Each operation goes to one of ``stubs`` (replicas of one
    deployment), picked at random."""

    def __init__(
        self, stubs: list[pb_grpc.InferenceServiceStub], ref: Reference, rng: random.Random
    ):
        self.stubs = stubs
        self.stub = stubs[0]
        self.ref = ref
        self.rng = rng
        self.np_rng = np.random.default_rng(rng.randrange(2**32))
        self.live: list[Tracked] = []
        self.request_id = 0
        self.played = False
        #: Another principal's stubs, when the server checks tokens: ``op_intrude`` uses them.
        self.intruders: list[Any] = []

    def pick(self) -> pb_grpc.InferenceServiceStub:
        return self.stubs[self.rng.randrange(len(self.stubs))]

    def send(self, r: Round, request: pb.StreamRequest) -> None:
        """Put ``request`` on the Stream of a replica picked at random."""
        r.streams.setdefault(self.rng.randrange(len(self.stubs)), []).append(request)

    def chunk(self, steps: int) -> np.ndarray:
        return self.np_rng.normal(0.0, 1.0, (steps, 3)).astype(np.float32)

    async def open(self) -> None:
        model = self.rng.choice(MODELS)
        reply = await self.stub.OpenSession(pb.OpenSessionRequest(model=model))
        self.live.append(Tracked(reply.session.session_id, model, self.ref.zeros(model)))

    # -- what an applied chunk, a retry and a refused chunk must answer ------------------------

    def apply(self, t: Tracked, seq: int, x: np.ndarray) -> tuple[np.ndarray, Any]:
        """Advance the model of ``t`` by the chunk: the outputs the server must give, and
        how to take the chunk back if the server answers UNAVAILABLE (not applied)."""
        assert seq == t.next_seq
        before = (t.state, t.next_seq, t.last)
        y, t.state = self.ref.run(t.model, x, t.state)
        t.next_seq = seq + x.shape[0]
        t.last = (seq, x, y)

        def undo() -> None:
            t.state, t.next_seq, t.last = before

        return y, undo

    @staticmethod
    def close_to(got: np.ndarray, want: np.ndarray, what: str) -> None:
        assert got.shape == want.shape, (what, got.shape, want.shape)
        assert np.max(np.abs(got - want)) <= TOL, what

    # -- operations ------------------------------------------------------------------------

    def op_unary(self, r: Round, t: Tracked) -> None:
        x = self.chunk(self.rng.randint(1, 3))
        seq = t.next_seq
        want, undo = self.apply(t, seq, x)

        stub = self.pick()

        async def call() -> None:
            try:
                reply = await stub.Step(
                    pb.StepRequest(session_id=t.sid, seq=seq, inputs=to_tensor(x))
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                undo()
                return
            self.close_to(np.asarray(from_tensor(reply.outputs)), want, f"unary {t.sid}")
            assert reply.next_seq == seq + x.shape[0]

        r.tasks.append(call())

    def op_retry(self, r: Round, t: Tracked) -> None:
        assert t.last is not None
        seq, x, want = t.last
        self.request_id += 1
        self.send(
            r,
            pb.StreamRequest(
                step=pb.StepRequest(session_id=t.sid, seq=seq, inputs=to_tensor(x)),
                request_id=self.request_id,
            ),
        )
        next_seq = t.next_seq

        def check(reply: pb.StreamResponse) -> None:
            if reply.WhichOneof("result") == "error" and reply.error.code == UNAVAILABLE:
                return
            assert reply.WhichOneof("result") == "step", reply
            self.close_to(np.asarray(from_tensor(reply.step.outputs)), want, f"retry {t.sid}")
            assert reply.step.next_seq == next_seq

        r.checks[self.request_id] = check

    def op_twice(self, r: Round, t: Tracked) -> None:
        """The same chunk sent twice at once, on a unary call and on a Stream (a client that
        resent it before the first answer came): both get its outputs, applied once."""
        x = self.chunk(self.rng.randint(1, 3))
        seq = t.next_seq
        want, undo = self.apply(t, seq, x)
        request = pb.StepRequest(session_id=t.sid, seq=seq, inputs=to_tensor(x))
        self.request_id += 1
        self.send(r, pb.StreamRequest(step=request, request_id=self.request_id))
        answers: list[str] = []

        def check(reply: pb.StreamResponse) -> None:
            if reply.WhichOneof("result") == "error" and reply.error.code == UNAVAILABLE:
                answers.append("unavailable")
                return
            assert reply.WhichOneof("result") == "step", reply
            self.close_to(np.asarray(from_tensor(reply.step.outputs)), want, f"twice {t.sid}")
            answers.append("ok")

        r.checks[self.request_id] = check
        stub = self.pick()

        async def call() -> None:
            try:
                reply = await stub.Step(request)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                answers.append("unavailable")
            else:
                self.close_to(np.asarray(from_tensor(reply.outputs)), want, f"twice {t.sid}")
                answers.append("ok")

        async def both() -> None:
            await call()
            r.after.append(lambda: undo() if "ok" not in answers else None)

        r.tasks.append(both())

    def op_stale(self, r: Round, t: Tracked) -> None:
        """A chunk that skips a step: refused with the seq the session expects."""
        x = self.chunk(1)
        next_seq = t.next_seq

        stub = self.pick()

        async def call() -> None:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Step(
                    pb.StepRequest(session_id=t.sid, seq=next_seq + 1, inputs=to_tensor(x))
                )
            if err.value.code() == grpc.StatusCode.UNAVAILABLE:
                return
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert next_seq_of(err.value) == next_seq

        r.tasks.append(call())

    def op_single(self, r: Round, t: Tracked) -> None:
        x = self.chunk(self.rng.randint(1, 3))
        seq = t.next_seq
        want, undo = self.apply(t, seq, x)
        self.request_id += 1
        self.send(
            r,
            pb.StreamRequest(
                step=pb.StepRequest(session_id=t.sid, seq=seq, inputs=to_tensor(x)),
                request_id=self.request_id,
            ),
        )

        def check(reply: pb.StreamResponse) -> None:
            if reply.WhichOneof("result") == "error" and reply.error.code == UNAVAILABLE:
                undo()
                return
            assert reply.WhichOneof("result") == "step", reply
            self.close_to(np.asarray(from_tensor(reply.step.outputs)), want, f"single {t.sid}")

        r.checks[self.request_id] = check

    def op_frame(self, r: Round, group: list[Tracked]) -> None:
        """A frame of ``group``: most entries step, some retry their last chunk, one may
        skip a step (only that entry fails)."""
        steps = self.rng.randint(1, 3)
        seqs: list[int] = []
        xs: list[np.ndarray] = []
        wants: list[tuple[str, Any]] = []
        for t in group:
            kind = self.rng.random()
            if kind < 0.15 and t.last is not None and t.last[1].shape[0] == steps:
                seq, x, y = t.last
                wants.append(("retry", (y, t.next_seq, None)))
            elif kind < 0.25:
                x, seq = self.chunk(steps), t.next_seq + 2
                wants.append(("stale", t.next_seq))
            else:
                x, seq = self.chunk(steps), t.next_seq
                y, undo = self.apply(t, seq, x)
                wants.append(("step", (y, t.next_seq, undo)))
            seqs.append(seq)
            xs.append(x)
        self.request_id += 1
        self.send(
            r,
            pb.StreamRequest(
                frame=pb.StepFrame(
                    session_ids=[t.sid for t in group], seqs=seqs, inputs=to_tensor(np.stack(xs))
                ),
                request_id=self.request_id,
            ),
        )

        def check(reply: pb.StreamResponse) -> None:
            assert reply.WhichOneof("result") == "frame", reply
            frame = reply.frame
            errors = {e.index: e.error for e in frame.errors}
            outs = np.asarray(from_tensor(frame.outputs))
            for i, (kind, want) in enumerate(wants):
                what = f"frame entry {i} ({kind}) of {group[i].sid}"
                if i in errors and errors[i].code == UNAVAILABLE:
                    if kind == "step":
                        want[2]()  # not applied
                    continue
                if kind == "stale":
                    assert errors[i].code == FAILED_PRECONDITION, what
                    assert errors[i].next_seq == want and frame.next_seqs[i] == want, what
                    continue
                assert i not in errors, (what, errors.get(i))
                y, next_seq, _ = want
                self.close_to(outs[i], y, what)
                assert frame.next_seqs[i] == next_seq, what

        r.checks[self.request_id] = check

    def op_intrude(self, r: Round, t: Tracked) -> None:
        """Another principal steps and reads the session on any replica: NOT_FOUND, as for
        an unknown id, and nothing moves or changes (the next operations check)."""
        stub = self.intruders[self.rng.randrange(len(self.intruders))]
        x = self.chunk(1)

        async def call() -> None:
            for request in (
                stub.Step(pb.StepRequest(session_id=t.sid, seq=t.next_seq, inputs=to_tensor(x))),
                stub.GetState(pb.GetStateRequest(session_id=t.sid)),
                stub.ResetSession(pb.ResetSessionRequest(session_id=t.sid)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await request
                assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value

        r.tasks.append(call())

    def op_reset(self, r: Round, t: Tracked) -> None:
        t.state = self.ref.zeros(t.model)
        t.last = None
        next_seq = t.next_seq

        stub = self.pick()

        async def call() -> None:
            reply = await stub.ResetSession(pb.ResetSessionRequest(session_id=t.sid))
            assert reply.session.next_seq == next_seq

        r.tasks.append(call())

    def op_fork(self, r: Round, t: Tracked) -> None:
        twin = Tracked("", t.model, dict(t.state), t.next_seq)

        stub = self.pick()

        async def call() -> None:
            reply = await stub.ForkSession(pb.ForkSessionRequest(session_id=t.sid))
            assert reply.session.next_seq == twin.next_seq
            twin.sid = reply.session.session_id
            self.live.append(twin)

        r.tasks.append(call())

    def op_close(self, r: Round, t: Tracked) -> None:
        self.live.remove(t)
        stub, other = self.pick(), self.pick()  # closed here, gone there too

        async def call() -> None:
            await stub.CloseSession(pb.CloseSessionRequest(session_id=t.sid))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await other.GetSession(pb.GetSessionRequest(session_id=t.sid))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

        r.tasks.append(call())

    def op_snapshot(self, r: Round, t: Tracked) -> None:
        state, next_seq, last = dict(t.state), t.next_seq, t.last

        stub = self.pick()

        async def call() -> None:
            reply = await stub.GetState(pb.GetStateRequest(session_id=t.sid))
            assert reply.snapshot.next_seq == next_seq
            t.saved = (reply.snapshot, state, next_seq, last)

        r.tasks.append(call())

    def op_restore(self, r: Round, t: Tracked) -> None:
        assert t.saved is not None
        snapshot, state, next_seq, last = t.saved
        t.state, t.next_seq, t.last = dict(state), next_seq, last

        stub = self.pick()

        async def call() -> None:
            reply = await stub.PutState(pb.PutStateRequest(session_id=t.sid, snapshot=snapshot))
            assert reply.session.next_seq == next_seq

        r.tasks.append(call())

    # -- a round ---------------------------------------------------------------------------

    def plan(self) -> Round:
        r = Round()
        free = list(self.live)
        self.rng.shuffle(free)
        # Some rounds touch a few sessions, others all: batches of every size.
        del free[: int(len(free) * self.rng.choice([0.0, 0.5, 0.9]))]
        while free:
            t = free.pop()
            roll = self.rng.random()
            if roll < 0.25 and len(free) >= 2:
                group = [t, *(free.pop() for _ in range(min(len(free), self.rng.randint(1, 9))))]
                self.op_frame(r, group)
            elif roll < 0.40:
                self.op_unary(r, t)
            elif roll < 0.55:
                self.op_single(r, t)
            elif roll < 0.62 and t.last is not None:
                self.op_retry(r, t)
            elif roll < 0.65:
                self.op_stale(r, t)
            elif roll < 0.67:
                self.op_twice(r, t)
            elif roll < 0.71:
                self.op_reset(r, t)
            elif roll < 0.75 and len(self.live) < 40:
                self.op_fork(r, t)
            elif roll < 0.78 and len(self.live) > 8:
                self.op_close(r, t)
            elif roll < 0.84:
                self.op_snapshot(r, t)
            elif roll < 0.88 and t.saved is not None:
                self.op_restore(r, t)
            elif roll < 0.92 and self.intruders:
                self.op_intrude(r, t)
        return r

    async def play(self, rounds: int, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """``rounds`` rounds (``before`` each one), keeping at least 8 sessions open; the
        first call opens 16."""
        while len(self.live) < (8 if self.played else 16):
            await self.open()
        self.played = True
        for _ in range(rounds):
            if before is not None:
                await before()
            await self.run(self.plan())
            while len(self.live) < 8:
                await self.open()

    async def check_seqs(self) -> None:
        """Every session the model tracks is where the model says, to its seq, wherever
        asked."""
        for t in self.live:
            info = await self.pick().GetSession(pb.GetSessionRequest(session_id=t.sid))
            assert info.session.next_seq == t.next_seq, t.sid

    async def run(self, r: Round) -> None:
        async def stream(index: int, requests: list[pb.StreamRequest]) -> None:
            async def send() -> AsyncIterator[pb.StreamRequest]:
                for req in requests:
                    yield req

            replies = [reply async for reply in self.stubs[index].Stream(send())]
            assert sorted(x.request_id for x in replies) == sorted(q.request_id for q in requests)
            for reply in replies:
                r.checks[reply.request_id](reply)

        async def later(task: Any) -> None:
            await asyncio.sleep(self.rng.choice([0.0, 0.0, 0.001, 0.003]))
            await task

        streams = [stream(i, reqs) for i, reqs in r.streams.items()]
        await asyncio.gather(*streams, *(later(task) for task in r.tasks))
        for then in r.after:
            then()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_rounds_keep_every_session_exact(
    server: Any, model_repo: Path, seed: int
) -> None:
    channel = grpc.aio.insecure_channel(server.address)
    harness = Harness(
        [pb_grpc.InferenceServiceStub(channel)], Reference(model_repo), random.Random(seed)
    )
    await harness.play(ROUNDS)
    await harness.check_seqs()
    await channel.close()


@pytest.mark.parametrize("every", [1, 16])
async def test_drains_hand_every_session_over_exactly(
    start_server: Any, redis_proc: Any, model_repo: Path, every: int
) -> None:
    """The same rounds on replicas sharing a Redis store, each drained (SIGTERM's path) after
    its rounds and the next one going on: every session, its retry cache and the snapshots
    taken before, continue exactly on the next replica, with no replay. At checkpoint_every
    1 most sessions are saved at their current seq, so a state change without a step (a
    reset) must reach the store by itself."""
    harness: Harness | None = None
    for name in ("a", "b", "c"):
        running = await start_server(
            store_url=redis_proc.url, replica_name=name, checkpoint_every=every
        )
        channel = grpc.aio.insecure_channel(running.address)
        stub = pb_grpc.InferenceServiceStub(channel)
        if harness is None:
            harness = Harness([stub], Reference(model_repo), random.Random(7))
        harness.stubs = [stub]
        harness.stub = stub
        await harness.play(ROUNDS // 2)
        final = Round()  # a reset as the last change before the drain: nothing steps after it
        for t in harness.live[:4]:
            harness.op_reset(final, t)
        await harness.run(final)
        await running.server.stop(10.0)
        await channel.close()
    assert harness is not None
    last = await start_server(store_url=redis_proc.url, replica_name="d")
    async with grpc.aio.insecure_channel(last.address) as channel:
        harness.stubs = [pb_grpc.InferenceServiceStub(channel)]
        await harness.check_seqs()
    assert last.server.metrics.takeovers._value.get() == len(harness.live)


async def test_sessions_evicted_to_the_store_come_back_exact(
    start_server: Any, redis_proc: Any, model_repo: Path
) -> None:
    """The rounds on one server with room for 10 sessions and a store: about half the sessions
    are evicted at any time (saved on the way out) and loaded back when next used; every
    answer is still exact."""
    running = await start_server(store_url=redis_proc.url, replica_name="small", max_sessions=10)
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        harness = Harness([stub], Reference(model_repo), random.Random(11))
        await harness.play(ROUNDS)
        await harness.check_seqs()
    assert running.server.metrics.takeovers._value.get() > 20


@pytest.mark.parametrize(("room", "tokens"), [(10_000, False), (10, False), (10_000, True)])
async def test_sessions_hopping_between_replicas_stay_exact(
    start_server: Any, redis_proc: Any, model_repo: Path, room: int, tokens: bool
) -> None:
    """The rounds on two live replicas of one deployment, each operation sent to either: a
    session hops between them all the time (each hop a takeover from the store, and a fence of
    the other copy). Between rounds both replicas' checkpoints are written (checkpoint_every
    1), so no hop needs a replay: every answer, retry cache, reset, fork, snapshot and close
    must be exact wherever it is asked. With room for 10 sessions, evictions come on top.
    With tokens, the sessions are alice's and bob calls them now and then on either replica:
    he gets NOT_FOUND, and nothing moves."""
    alice, bob = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef01"
    auth = {"auth_tokens": f"alice:{alice},bob:{bob}"} if tokens else {}
    replicas = [
        await start_server(
            store_url=redis_proc.url,
            replica_name=name,
            checkpoint_every=1,
            max_sessions=room,
            **auth,
        )
        for name in ("a", "b")
    ]
    channels = [grpc.aio.insecure_channel(r.address) for r in replicas]
    stubs = [pb_grpc.InferenceServiceStub(c) for c in channels]
    if tokens:
        as_alice = (("authorization", f"Bearer {alice}"),)
        as_bob = (("authorization", f"Bearer {bob}"),)
        harness = Harness(
            [As(s, as_alice) for s in stubs], Reference(model_repo), random.Random(13)
        )
        harness.intruders = [As(s, as_bob) for s in stubs]
    else:
        harness = Harness(stubs, Reference(model_repo), random.Random(13))

    async def settle() -> None:
        for r in replicas:
            assert r.server.durable is not None
            assert await r.server.durable.checkpoints.flush(5.0)

    await harness.play(ROUNDS, before=settle)
    await settle()
    await harness.check_seqs()
    takeovers = sum(r.server.metrics.takeovers._value.get() for r in replicas)
    assert takeovers > 50
    for c in channels:
        await c.close()
