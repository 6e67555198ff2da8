"""The inference worker's job handler on the bus twin (``tests/twin_shell.py``):
the real ``JobHandler`` on the simulator engine, a context store answering
windows and appends, results published as the orchestrator reads them. On
real processes (shared stack): ``tests/test_worker_republish.py``,
``tests/test_end_to_end.py``, ``tests/test_orchestrator.py`` (cancel)."""

from __future__ import annotations

import asyncio

from baton.bus import Delivery
from proto import codec, keys, subjects
from proto.messages import (
    Cancel,
    ChatMessage,
    ContextAppend,
    ContextAppendReply,
    InferenceJob,
    InferenceResult,
)
from proto.streams import DEAD_LETTERS, worker_consumer
from services.inference_worker.jobs import JobHandler
from tests.test_conductor_shell import WORKFLOWS
from tests.twin_shell import TASKS, TENANT, Shell

POOL = worker_consumer("default")


async def _shell() -> tuple[Shell, JobHandler]:
    shell = await Shell.start(WORKFLOWS)
    return shell, await shell.job_handler()


async def _asked(shell: Shell, session: str = "s1") -> ContextAppend:
    ask = ContextAppend(tenant=TENANT, session=session, msg_id="m1", system="be brief",
                        messages=[ChatMessage(role="user", content="hello there")])  # fmt: skip
    await shell.twin.request(f"{subjects.CONTEXT_API}.append.{TENANT}", ask, ContextAppendReply)
    return ask


def _job(shell: Shell, attempt: int = 1, task_id: str = "t1") -> InferenceJob:
    return InferenceJob(job_id="j1", task_id=task_id, tenant=TENANT, session="s1",
                        workflow="chat", step="r1.answer", agent="a", max_tokens=8,
                        ref=shell.store.refs["m1"], attempt=attempt)  # fmt: skip


async def _run_job(shell: Shell, jobs: JobHandler, job: InferenceJob | bytes) -> None:
    async def handle(d: Delivery) -> None:
        await jobs.handle(d, lambda: None)

    msg_id = None if isinstance(job, bytes) else keys.job_message(job.job_id, job.attempt)
    await shell.twin.publish(subjects.job(POOL.durable.removeprefix("worker-")), job,
                             msg_id=msg_id)  # fmt: skip
    assert await shell.twin.deliver(POOL.durable, handle)


def _results(shell: Shell, task_id: str = "t1") -> list[tuple[str, InferenceResult]]:
    return [(m.headers["Nats-Msg-Id"], codec.decode(m.data, InferenceResult))
            for m in shell.twin.messages(subjects.result(TENANT, task_id))]  # fmt: skip


async def test_a_job_is_generated_appended_and_answered_under_its_attempts_msg_id() -> None:
    shell, jobs = await _shell()
    await _asked(shell)
    await _run_job(shell, jobs, _job(shell))
    [(msg_id, result)] = _results(shell)
    assert msg_id == keys.result("j1", 1) and result.error is None
    answer = shell.store.appends[keys.answer("j1")]  # the answer is in the session
    assert result.output and answer.messages[0].content == result.output
    assert result.ref == shell.store.refs[keys.answer("j1")]
    assert result.usage.completion_tokens > 0 and result.usage.prompt_tokens > 0


async def test_a_retried_jobs_republished_result_is_a_new_message() -> None:
    """(Moved from tests/test_worker_republish.py, which keeps the republish
    of a stored answer against the real context store.) Attempt 2 of a job
    whose answer is stored is answered from the store under attempt 2's
    Msg-Id: under the first result's, JetStream would drop it as a duplicate."""
    shell, jobs = await _shell()
    await _asked(shell)
    await _run_job(shell, jobs, _job(shell, attempt=1))
    await _run_job(shell, jobs, _job(shell, attempt=2))
    (id1, first), (id2, again) = _results(shell)
    assert (id1, id2) == (keys.result("j1", 1), keys.result("j1", 2))
    assert again.error is None and again.output == first.output and again.ref == first.ref
    assert again.usage.completion_tokens == 0  # not generated again


async def test_a_job_of_a_cancelled_task_is_answered_cancelled_without_generating() -> None:
    shell, jobs = await _shell()
    await _asked(shell)
    await jobs.on_cancel(Cancel(tenant=TENANT, task_id="t1"))
    await _run_job(shell, jobs, _job(shell))
    [(_, result)] = _results(shell)
    assert result.error is not None and result.error.code == "cancelled"
    assert keys.answer("j1") not in shell.store.appends


async def test_an_undecodable_job_is_dead_lettered_once() -> None:
    shell, jobs = await _shell()
    await shell.twin.provision(streams=[DEAD_LETTERS])
    await _run_job(shell, jobs, b"\xc1 not a job")
    assert [m.data for m in shell.twin.messages(subjects.dead_letter(POOL.durable))] == [
        b"\xc1 not a job"
    ]
    assert shell.twin.ready(POOL.durable) == []  # never redelivered


async def test_a_chat_task_runs_from_task_to_completed_through_conductor_and_job_handler() -> None:
    """Both shells on one twin: the conductor dispatches, the real job handler
    answers on the simulator engine, the conductor records and completes."""
    shell, jobs = await _shell()

    async def handle(d: Delivery) -> None:
        await jobs.handle(d, lambda: None)

    await shell.submit("chat", "t2", "hello")
    assert await shell.handle(TASKS)
    assert await shell.twin.deliver(POOL.durable, handle)
    await shell.settle_all()
    events = shell.events("t2")
    assert events[0]["type"] == "accepted" and events[-1]["type"] == "completed"
    run = await shell.run("t2")
    assert (
        run is not None and run.usage.completion_tokens == events[-1]["usage"]["completion_tokens"]
    )
    assert run.usage.completion_tokens > 0


async def test_a_dispatch_older_than_one_already_taken_is_acked_without_a_result() -> None:
    """(On the stack too: tests/test_worker_republish.py.)"""
    shell, jobs = await _shell()
    await _asked(shell)
    for attempt in (2, 1, 3):
        await _run_job(shell, jobs, _job(shell, attempt=attempt))
    assert [i for i, _ in _results(shell)] == [keys.result("j1", 2), keys.result("j1", 3)]
    assert shell.twin.unsettled(POOL.durable) == 0  # attempt 1 was acked, not naked


async def test_a_retry_that_arrives_while_its_first_dispatch_runs_here_is_not_generated_again() -> (
    None
):
    """The step's deadline passed while its first dispatch was generating on
    this worker (rescued late from a dead peer's queue: the chaos tier's seed
    707): the retry waits for it, finds the answer stored and republishes it.
    Two results, one generation."""
    shell, jobs = await _shell()
    await _asked(shell)

    async def handle(d: Delivery) -> None:
        await jobs.handle(d, lambda: None)

    for attempt in (1, 2):
        job = _job(shell, attempt=attempt)
        await shell.twin.publish(subjects.job("default"), job,
                                 msg_id=keys.job_message(job.job_id, attempt))  # fmt: skip
    ready = shell.twin.ready(POOL.durable)
    assert len(ready) == 2
    await asyncio.gather(*(shell.twin.deliver(POOL.durable, handle, seq) for seq in ready))
    results = _results(shell)
    assert sorted(i for i, _ in results) == [keys.result("j1", 1), keys.result("j1", 2)]
    generated = [r for _, r in results if r.usage.completion_tokens > 0]
    assert len(generated) == 1, [r.usage for _, r in results]
    assert len({r.output for _, r in results}) == 1
