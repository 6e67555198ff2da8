"""The console's pure parts: session tokens (baton/sessions.py) and what the
task page draws (services/orchestrator/console/views.py), without a browser."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import HTTPException
from fastapi.security import HTTPAuthorizationCredentials
from starlette.requests import Request

from baton.service import caller_scope
from baton.sessions import SessionKeys, key_id, same_origin
from baton.tenants import key_digest
from proto.errors import ErrorCode
from proto.messages import ErrorInfo, InferenceJob
from services.orchestrator import transitions as T
from services.orchestrator.console.views import task_view
from services.orchestrator.state import RunState
from tests.test_transitions import RULES, WORKFLOWS, decide, jobs, new_task, reply

KEYS = {"bk-acme": "acme", "bk-op": "*"}


def test_a_session_token_verifies_until_it_expires_and_only_as_its_kind() -> None:
    keys = SessionKeys(KEYS)
    token = keys.issue("bk-acme", "session", nonce="n1", expires=1000.0)
    grant = keys.verify(token, "session", now=999.0)
    assert grant is not None and (grant.scope, grant.nonce) == ("acme", "n1")
    assert keys.verify(token, "session", now=1000.0) is None  # expired
    assert keys.verify(token, "login", now=10.0) is None  # not a login token
    assert "bk-acme" not in token  # the key itself never travels


def test_a_forged_or_altered_token_or_one_whose_key_went_is_refused() -> None:
    keys = SessionKeys(KEYS)
    token = keys.issue("bk-acme", "session", nonce="n1", expires=1000.0)
    kind, kid, scope, nonce, expires, sig = token.split(".")
    for bad in (f"{kind}.{kid}.*.{nonce}.{expires}.{sig}",  # an operator's scope claimed
                f"{kind}.{kid}.{scope}.{nonce}.9999999.{sig}",  # a longer life claimed
                f"{kind}.{kid}.{scope}.{nonce}.{expires}.{sig[:-2]}AA"):  # fmt: skip
        assert keys.verify(bad, "session", now=10.0) is None, bad
    assert SessionKeys({"bk-op": "*"}).verify(token, "session", 10.0) is None  # key removed
    assert SessionKeys({"bk-acme": "globex"}).verify(token, "session", 10.0) is None  # moved
    assert SessionKeys(dict(KEYS)).verify(token, "session", 10.0) is not None  # a replica


def test_a_key_withdrawn_at_run_time_ends_its_sessions() -> None:
    """The orchestrator withdraws a tenant's configured key when the
    registry rotates or deletes the tenant: its console sessions go with it."""
    live = dict(KEYS)
    keys = SessionKeys(live)
    token = keys.issue("bk-acme", "session", nonce="n1", expires=1000.0)
    assert keys.verify(token, "session", now=10.0) is not None
    del live["bk-acme"]
    live[key_digest("bk-acme2")] = "acme"  # its new key, known by its digest
    assert keys.verify(token, "session", now=10.0) is None
    assert keys.scope_of("bk-acme") is None
    assert keys.verify(keys.issue("bk-acme2", "session", nonce="n2", expires=1000.0),
                       "session", now=10.0) is not None  # fmt: skip


def test_a_key_known_only_by_its_digest_opens_a_session_like_a_configured_one() -> None:
    """A tenant created at run time: the registry (and so the live keys)
    holds only ``sha256:<hex>`` of its key; a replica with only the digest
    verifies what another issued, and the configured keys' tokens still work."""
    live = {**KEYS, key_digest("bk-globex"): "globex"}
    keys = SessionKeys(live)
    assert keys.scope_of("bk-globex") == "globex"
    assert keys.scope_of(key_digest("bk-globex")) is None  # the digest is not the key
    assert keys.scope_of("bk-globe") is None
    login = keys.issue("bk-globex", "login", nonce="l1", expires=1000.0)
    link = keys.verify(login, "login", now=10.0)
    assert link is not None and link.scope == "globex" and link.key_id == key_id("bk-globex")
    token = keys.issue_for(link.key_id, "session", nonce="n1", expires=1000.0,
                           scope=link.scope)  # no key needed  # fmt: skip
    with pytest.raises(KeyError):  # not for another scope than the grant's
        keys.issue_for(link.key_id, "session", nonce="n1", expires=1000.0, scope="*")
    grant = SessionKeys({key_digest("bk-globex"): "globex"}).verify(token, "session", 10.0)
    assert grant is not None and grant.scope == "globex"
    csrf = keys.csrf(grant)
    assert keys.csrf_ok(grant, csrf) and not keys.csrf_ok(grant, "x")
    # the same key configured in plaintext signs the same tokens
    assert SessionKeys({"bk-globex": "globex"}).verify(token, "session", 10.0) == grant
    kind, kid, scope, nonce, expires, sig = token.split(".")
    for bad in (f"{kind}.{kid}.*.{nonce}.{expires}.{sig}",
                f"{kind}.{kid}.{scope}.{nonce}.9999999.{sig}",
                f"{kind}.{kid}.{scope}.{nonce}.{expires}.{sig[:-2]}AA",
                f"{kind}.{kid[:-1]}0.{scope}.{nonce}.{expires}.{sig}"):  # fmt: skip
        assert keys.verify(bad, "session", now=10.0) is None, bad
    op = keys.issue("bk-op", "session", nonce="o", expires=1000.0)  # a configured key's
    assert keys.verify(op, "session", now=10.0) is not None
    del live[key_digest("bk-globex")]  # rotated or deleted: withdrawn
    assert keys.verify(token, "session", now=10.0) is None
    assert not keys.csrf_ok(grant, csrf)  # nor its CSRF token
    with pytest.raises(KeyError):
        keys.issue_for(link.key_id, "session", nonce="n2", expires=1000.0)
    assert keys.scope_of("bk-globex") is None
    assert keys.verify(op, "session", now=10.0) is not None  # other keys' sessions stay


def test_a_digest_presented_as_a_bearer_key_is_refused() -> None:
    """Whoever reads a digest in the registry does not hold the key: the
    HTTP API refuses ``Authorization: Bearer sha256:<hex>``."""
    scope = caller_scope({key_digest("bk-globex"): "globex"})
    request = Request({"type": "http", "method": "GET", "headers": [], "path": "/v1/tasks"})

    def bearer(key: str) -> HTTPAuthorizationCredentials:
        return HTTPAuthorizationCredentials(scheme="Bearer", credentials=key)

    assert scope(request, bearer("bk-globex")) == "globex"
    with pytest.raises(HTTPException) as refused:
        scope(request, bearer(key_digest("bk-globex")))
    assert refused.value.status_code == 401


def test_the_csrf_token_belongs_to_one_session() -> None:
    keys = SessionKeys(KEYS)
    a = keys.verify(keys.issue("bk-acme", "session", nonce="a", expires=99), "session", 1)
    b = keys.verify(keys.issue("bk-acme", "session", nonce="b", expires=99), "session", 1)
    assert a is not None and b is not None
    assert keys.csrf_ok(a, keys.csrf(a)) and not keys.csrf_ok(a, keys.csrf(b))
    assert not keys.csrf_ok(a, None)


def test_same_origin_compares_the_origin_with_the_host() -> None:
    assert same_origin(None, "127.0.0.1:8080")  # not a browser's cross-site request
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert not same_origin("https://evil.example", "127.0.0.1:8080")


def _run_to(step: str, *, fail: ErrorInfo | None = None) -> RunState:
    """A research run advanced until ``step`` is dispatched (then failed with ``fail``)."""
    out = decide(T.start, None, new_task(), RULES, now=100.0)
    assert isinstance(out, T.Transition)
    run, now = out.run, 100.0
    while True:
        now += 1.0
        job: InferenceJob = next(j for j in jobs(T.replay(run, RULES, now)))
        if job.step == step:
            if fail is None:
                return run
            res = reply(job, error=fail)
        else:
            text = '{"next": "accept"}' if "validate" in job.step else "fine"
            res = reply(job, text)
        nxt = decide(T.result, run, res, RULES, now=now)
        assert isinstance(nxt, T.Transition)
        run = nxt.run
        if fail is not None and job.step == step:
            return run


def _events(run: RunState) -> list[dict[str, Any]]:
    return [{"type": "step", "step": k, "status": "started", "ts": s.dispatched_at}
            for k, s in run.steps.items()]  # fmt: skip


def test_the_waterfall_has_every_step_by_agent_and_marks_the_failed_layer() -> None:
    err = ErrorInfo.of(ErrorCode.PROMPT_TOO_LONG, "prompt of 2049 tokens exceeds 2048")
    run = _run_to("r1.validate", fail=err)
    spec = WORKFLOWS["research"].spec
    view = task_view(run, spec, _events(run), now=200.0)
    assert view["status"] == "failed" and view["failed_layer"] == "inference"
    assert [s["id"] for s in view["steps"]][:1] == ["r1.plan"]
    assert {s["id"]: s["agent"] for s in view["steps"]}["r1.gather.coding"] == "coding"
    assert view["agents"][0] == "supervisor" and "validation" in view["agents"]
    failed = [s for s in view["steps"] if s["failed"]]
    assert [(s["id"], s["layer"], s["code"]) for s in failed] == [
        ("r1.validate", "inference", "prompt_too_long")]  # fmt: skip
    assert all(s["phases"] and s["end"] >= s["start"] for s in view["steps"])
    nodes = {n["id"]: n for n in view["graph"]["nodes"]}
    assert nodes["summarize"]["runs"] == [] and nodes["validate"]["runs"][0]["status"] == "failed"
    assert any(e["back"] and e["to"] == "plan" for e in view["graph"]["edges"])


def test_a_running_step_ends_now_and_a_finished_one_at_its_end() -> None:
    run = _run_to("r1.validate")
    view = task_view(run, WORKFLOWS["research"].spec, _events(run), now=500.0)
    steps = {s["id"]: s for s in view["steps"]}
    assert steps["r1.validate"]["running"] and steps["r1.validate"]["end"] == 500.0 - run.created_at
    assert not steps["r1.plan"]["running"]
    assert steps["r1.plan"]["end"] == run.steps["r1.plan"].finished_at - run.created_at
    assert view["failed_layer"] is None and view["error"] is None
    assert steps["r1.plan"]["context"]["session"] == run.session


def test_a_forked_runs_carried_steps_are_not_drawn_on_its_clock() -> None:
    from tests.test_fork_transitions import _finished_research, _fork

    out = _fork(_finished_research(), "r1.validate", None, now=500.0)
    assert isinstance(out, T.Transition)
    view = task_view(out.run, WORKFLOWS["research"].spec, [], now=501.0)
    steps = {s["id"]: s for s in view["steps"]}
    assert steps["r1.plan"]["carried"] and steps["r1.plan"]["phases"] == []
    assert steps["r1.plan"]["start"] == 0 and steps["r1.gather.coding"]["calls"] == []
    assert steps["r1.validate"]["running"] and steps["r1.validate"]["start"] >= 0
    assert view["forked_from"] == "t1" and view["forked_at"] == "r1.validate"


def test_a_step_with_timing_fields_is_drawn_phase_by_phase() -> None:
    """With the step timing fields (results carry a ``Timing``), each step's
    row is its phases end to end from when it was queued."""
    import proto.messages as pm

    phases = pm.Phases(queue=0.25, context=0.02, admission=0.01, prefill=0.05, decode=0.4)
    out = decide(T.start, None, new_task(), RULES, now=100.0)
    assert isinstance(out, T.Transition)
    run = out.run
    job = jobs(T.replay(run, RULES, 100.0))[0]
    timing = pm.Timing(queued_at=100.0, started_at=100.25, first_token_at=100.33,
                       finished_at=100.73, phases=phases)  # fmt: skip
    done = decide(T.result, run, reply(job, "plan", timing=timing), RULES, now=101.0)
    assert isinstance(done, T.Transition)
    view = task_view(done.run, WORKFLOWS["research"].spec, [], now=101.0)
    plan = next(s for s in view["steps"] if s["id"] == "r1.plan")
    assert plan["measured"]
    names = [p["name"] for p in plan["phases"]]
    assert names[:5] == ["queue", "context", "admission", "prefill", "decode"]
    assert plan["phases"][1]["start"] == 0.25  # laid end to end from the queueing
    assert plan["start"] == 0.0  # queued at the run's creation
