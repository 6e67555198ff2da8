"""The run console in a real headless Chromium: the live list, the waterfall
of a research task by agent, the layer of a failure, cancel and the answer
of an input step from the page, a fork from a step, parallel agents' token
streams side by side, and a tenant that sees nobody else's tasks."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from typing import Any

from baton.dev.testing import metric
from tests.browser.conftest import shot
from tests.console_stack import ConsoleEnv

RESEARCH = "compare two sorting algorithms"  # the simulated validator accepts it
REDRAWN = "() => document.querySelector('#waterfall') !== window.drawn"


def _open_task(page: Any, task_id: str) -> None:
    page.click(f"tr[data-task='{task_id}']")
    page.wait_for_selector("#waterfall")


def _status(page: Any, status: str, timeout: float = 60_000) -> None:
    """Wait until the task the address names is drawn with `status` (not the
    one drawn before a navigation to it)."""
    page.wait_for_function(
        """s => document.querySelector('.taskhead h1')?.textContent === location.hash.split('/').pop()
             && document.querySelector('#task-status')?.textContent === s""", arg=status,
        timeout=timeout,
    )  # fmt: skip


def _redrawn(page: Any) -> None:
    """Wait for the task page's next redraw (a refresh replaces the waterfall)."""
    page.evaluate("window.drawn = document.querySelector('#waterfall')")
    page.wait_for_function(REDRAWN, timeout=15_000)


def test_the_live_list_shows_a_research_task_and_the_waterfall_every_step_by_agent(
    env: ConsoleEnv, browser_for: Any
) -> None:
    page = browser_for("acme")
    task_id = env.submit("acme", "research", RESEARCH)  # after the page opened: live
    page.wait_for_selector(f"tr[data-task='{task_id}']")
    row = page.locator(f"tr[data-task='{task_id}']")
    assert "research" in row.inner_text() and "acme" in row.inner_text()
    page.wait_for_function(  # the row follows the task without a reload
        "id => document.querySelector(`tr[data-task='${id}'] .status`).textContent === 'completed'",
        arg=task_id,
    )  # fmt: skip
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    shot(page, "task-list")
    _open_task(page, task_id)
    _status(page, "completed")
    doc = env.wait("acme", task_id, lambda d: d["status"] == "completed")
    assert len(doc["steps"]) == 5
    for step_id, st in doc["steps"].items():
        bar = page.locator(f".row[data-step='{step_id}'][data-agent='{st['agent']}'] .bar")
        assert bar.count() >= 1, step_id
    lanes = page.locator(".lane").all_inner_texts()
    assert {"supervisor", "retrieval", "coding", "validation"} <= set(lanes)
    assert page.locator("#graph .node.taken").count() == 4
    assert page.locator(".row.call").count() >= 1  # the workers' tool calls
    page.click(".row[data-step='r1.plan']")
    page.click("#detail .show-context")
    page.wait_for_selector("#context .msg")
    assert RESEARCH in page.locator("#context").inner_text()  # the window plan started from
    shot(page, "research-waterfall")


def test_a_task_that_failed_in_the_inference_layer_shows_that_layer(
    env: ConsoleEnv, browser_for: Any
) -> None:
    task_id = env.submit("acme", "broken", "hello")
    env.wait("acme", task_id, lambda d: d["status"] == "failed")
    page = browser_for("acme")
    _open_task(page, task_id)
    banner = page.locator("#failure")
    assert banner.get_attribute("data-layer") == "inference"
    assert (
        "inference layer" in banner.inner_text().lower()
        and "prompt_too_long" in banner.inner_text()
    )
    failed = page.locator(".row.failed")
    assert failed.count() == 1 and failed.get_attribute("data-step") == "r1.second"
    assert failed.locator("[data-failed-layer]").get_attribute("data-failed-layer") == "inference"
    shot(page, "inference-failure")


def test_parallel_streams_side_by_side_and_cancel_from_the_page(
    env: ConsoleEnv, browser_for: Any
) -> None:
    task_id = env.submit("acme", "duo", "count slowly")
    page = browser_for("acme")
    page.wait_for_selector(f"tr[data-task='{task_id}']")
    _open_task(page, task_id)
    for step in ("r1.fan.alpha", "r1.fan.beta"):
        page.wait_for_function(
            "s => (document.querySelector(`pre[data-stream='${s}']`)?.textContent || '').length > 20",
            arg=step,
        )  # fmt: skip
    # Both boxes measured in one frame: a refresh redraws them, so two
    # separate lookups could each meet a box about to be replaced.
    a, b = page.evaluate(
        """() => ['r1.fan.alpha', 'r1.fan.beta'].map((s) => {
            const r = document.querySelector(`[data-stream-box='${s}']`).getBoundingClientRect();
            return { x: r.x, y: r.y, width: r.width };
        })"""
    )
    assert a["width"] > 0 and b["width"] > 0
    assert abs(a["y"] - b["y"]) < 2 and a["x"] != b["x"]  # side by side
    shot(page, "parallel-streams")
    # A redraw keeps the boxes (a reader's scroll in them), redrawing only their heads.
    box = "document.querySelector(\"[data-stream-box='r1.fan.alpha']\")"
    page.evaluate(f"window.box = {box}")
    _redrawn(page)
    assert page.evaluate(f"{box} === window.box")
    shown = {s: page.locator(f"pre[data-stream='{s}']").inner_text()
             for s in ("r1.fan.alpha", "r1.fan.beta")}  # fmt: skip
    page.click("#cancel")
    _status(page, "cancelled", timeout=20_000)
    assert env.wait("acme", task_id, lambda d: d["status"] != "running")["status"] == "cancelled"
    # Each box held one step's text only: a prefix of that step's deltas.
    deltas = _deltas(env, task_id)
    for step, text in shown.items():
        assert deltas[step].startswith(text.rstrip()), step


def _deltas(env: ConsoleEnv, task_id: str) -> dict[str, str]:
    req = urllib.request.Request(f"{env.url}/v1/tasks/{task_id}/tokens",
                                 headers={"Authorization": f"Bearer {env.keys['acme']}"})  # fmt: skip
    out: dict[str, str] = {}
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data:"):
                d = json.loads(line[5:])
                if "step" in d and "text" in d:
                    out[d["step"]] = out.get(d["step"], "") + d["text"]
    return out


def test_an_input_step_is_answered_from_the_page(env: ConsoleEnv, browser_for: Any) -> None:
    task_id = env.submit("acme", "ask", "a release note")
    env.wait("acme", task_id, lambda d: d["steps"].get("r1.confirm", {}).get("status")
             == "waiting_input")  # fmt: skip
    page = browser_for("acme")
    _open_task(page, task_id)
    assert "Ship this draft?" in page.locator(".answer").inner_text()
    page.fill("#answer", "yes, ship it")
    # The page redraws every 2 s while the task runs: what was typed, and the
    # caret, survive it (they used to be wiped).
    _redrawn(page)
    assert page.input_value("#answer") == "yes, ship it"
    assert page.evaluate("document.activeElement.id") == "answer"
    page.click("#answer-send")
    _status(page, "completed")
    doc = env.wait("acme", task_id, lambda d: d["status"] == "completed")
    assert doc["steps"]["r1.confirm"]["answered_by"] == "human"
    assert doc["steps"]["r1.confirm"]["output"] == "yes, ship it"


def test_a_fork_from_a_step_runs_again_only_the_steps_after_it(
    env: ConsoleEnv, browser_for: Any
) -> None:
    old_id = env.submit("acme", "research", RESEARCH)
    old = env.wait("acme", old_id, lambda d: d["status"] == "completed")
    worker = next(p for p in env.stack.procs if p.name == "inference-worker")
    jobs_before = metric(worker.url, "baton_worker_jobs_total", outcome="completed")
    page = browser_for("acme")
    _open_task(page, old_id)
    page.click(".row[data-step='r1.validate']")
    page.fill("#detail .fork-input", "Also check stability.")
    page.click("#detail .fork-go")
    page.wait_for_function("id => location.hash.includes('/t/acme/') && !location.hash.endsWith(id)",
                           arg=old_id)  # fmt: skip
    new_id = page.evaluate("location.hash.split('/').pop()")
    _status(page, "completed")
    new = env.wait("acme", new_id, lambda d: d["status"] == "completed")
    assert (new["forked_from"], new["forked_at"]) == (old_id, "r1.validate")
    for step in ("r1.plan", "r1.gather.retrieval", "r1.gather.coding"):  # not run again
        assert new["steps"][step]["carried"]
        assert new["steps"][step]["finished_at"] == old["steps"][step]["finished_at"]
        assert page.locator(f".row.carried[data-step='{step}']").count() == 1
    assert new["steps"]["r1.validate"]["dispatched_at"] > old["updated_at"]
    # The worker ran the new steps' model turns (the validator may send the
    # edited run round again), none of the carried steps'.
    jobs = metric(worker.url, "baton_worker_jobs_total", outcome="completed") - jobs_before
    ran = [s for s in new["steps"].values() if s["agent"] and not s["carried"]]
    assert jobs == sum(s["turn"] + 1 for s in ran) and "r1.plan" not in [
        k for k, s in new["steps"].items() if not s["carried"]]  # fmt: skip
    assert env.wait("acme", old_id, lambda d: True)["updated_at"] == old["updated_at"]
    shot(page, "fork")


def test_another_tenants_key_sees_none_of_it(env: ConsoleEnv, browser_for: Any) -> None:
    acme_task = env.submit("acme", "chat", "private to acme")
    env.wait("acme", acme_task, lambda d: d["status"] == "completed")
    page = browser_for(login=False)  # a person pastes globex's key
    page.fill("#key", env.keys["globex"])
    page.click("button[type=submit]")
    page.wait_for_selector("#tasks", state="attached")
    time.sleep(0.5)
    assert page.locator(f"tr[data-task='{acme_task}']").count() == 0
    tenants = {t.strip() for t in page.locator("#tasks tr td:nth-child(2)").all_inner_texts()}
    assert tenants <= {"globex"}
    assert re.search("tenant globex", page.locator("#who").inner_text())
    page.goto(f"{env.url}/ui/#/t/acme/{acme_task}")
    page.wait_for_selector("#task-error")
    assert "unknown_task" in page.locator("#task-error").inner_text()
    page.goto(f"{env.url}/ui/?login=refused")  # and a wrong key is told so
    page.click("#logout")
    page.wait_for_selector("#key")
    page.fill("#key", "bk-not-a-key")
    page.click("button[type=submit]")
    page.wait_for_selector("#login-error")
