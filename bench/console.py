"""The run console in headless Chromium (Debian's, driven by Playwright):
page weight (bytes transferred, from the Resource Timing API) and time to
interactive (the page's own ``baton-interactive`` mark, set once it drew its
first data) of the task list and of a research task's page, each with a
fresh profile (cold cache), against a bare page from the same server
(``/healthz``) loaded the same way in the same round; and the path a
newcomer takes to name the failed layer of a broken task (one click from
the list), timed from the click to the highlighted layer on screen."""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from baton.dev.testing import (
    CHROMIUM,
    CHROMIUM_ARGS,
    INFERENCE_FAILURE_WORKFLOW,
    LocalStack,
    RefusingModelServer,
    refusing_worker,
    secure_nats,
    uid,
)
from baton.sessions import COOKIE
from bench.stats import pct

ROUNDS = 7
LIST_TASKS = 25  # a full first page

_WEIGHT = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const res = performance.getEntriesByType('resource').filter((r) => !r.name.includes('/feed')
    && !r.name.includes('/events') && !r.name.includes('/tokens'));
  const mark = performance.getEntriesByName('baton-interactive')[0];
  return {tti_ms: mark ? mark.startTime : null, load_ms: nav.loadEventEnd || nav.duration,
          transfer: nav.transferSize + res.reduce((a, r) => a + r.transferSize, 0),
          decoded: nav.decodedBodySize + res.reduce((a, r) => a + r.decodedBodySize, 0),
          requests: 1 + res.length,
          by_type: res.map((r) => [r.name.split('?')[0].split('/').slice(-2).join('/'),
                                   r.transferSize])};
}"""


def _post(url: str, key: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(url, json.dumps(body or {}).encode(),
                                 {"Authorization": f"Bearer {key}",
                                  "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


class _Keep(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None  # the login answer itself carries the cookie


def _session(base: str, key: str) -> str:
    """A console session cookie, by the login link (as `baton console`)."""
    link = _post(f"{base}/ui/login-link", key)["path"]
    form = urllib.parse.urlencode({"token": link.split("token=", 1)[1]}).encode()
    try:
        urllib.request.build_opener(_Keep).open(f"{base}/ui/login", form, timeout=30)
    except urllib.error.HTTPError as exc:  # the 303 with Set-Cookie
        cookie = SimpleCookie(exc.headers["Set-Cookie"])
        return cookie[COOKIE].value
    raise AssertionError("the login link did not answer with a cookie")


def _get(url: str, key: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait(base: str, key: str, task_id: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _get(f"{base}/v1/tasks/{task_id}", key)["status"] != "running":
            return
        time.sleep(0.2)
    raise TimeoutError(task_id)


def _submit(base: str, key: str, workflow: str, text: str) -> str:
    task_id = uid("b")
    _post(f"{base}/v1/tasks", key, {"workflow": workflow, "input": text, "task_id": task_id})
    return task_id


def _round(pw: Any, work: Path, base: str, key: str, research: str, broken: str, i: int) -> Any:
    def fresh(name: str) -> Any:
        ctx = pw.chromium.launch_persistent_context(
            str(work / f"profile-{i}-{name}"), executable_path=CHROMIUM, headless=True,
            args=list(CHROMIUM_ARGS), viewport={"width": 1400, "height": 900})  # fmt: skip
        return ctx, ctx.pages[0] if ctx.pages else ctx.new_page()

    def logged_in(name: str) -> Any:
        """A fresh profile holding a session cookie, nothing cached yet."""
        ctx, page = fresh(name)
        ctx.add_cookies([{"name": COOKIE, "value": _session(base, key), "url": base}])
        return ctx, page

    out: dict[str, Any] = {}
    order = ["bare", "list", "task", "newcomer"]
    if i % 2:
        order.reverse()
    for what in order:
        if what == "bare":
            ctx, page = fresh("bare")
            page.goto(f"{base}/healthz")
            page.wait_for_load_state("load")
            out["bare"] = page.evaluate(_WEIGHT)
        elif what == "list":
            ctx, page = logged_in("list")
            page.goto(f"{base}/ui/")
            page.wait_for_selector("body[data-ready]")
            page.wait_for_selector(f"tr[data-task='{broken}']")
            out["list"] = page.evaluate(_WEIGHT)
        elif what == "task":
            ctx, page = logged_in("task")
            page.goto(f"{base}/ui/#/t/acme/{research}")
            page.wait_for_selector("#waterfall")
            out["task"] = page.evaluate(_WEIGHT)
        else:
            ctx, page = logged_in("newcomer")
            page.goto(f"{base}/ui/")
            page.wait_for_selector(f"tr[data-task='{broken}']")
            t0 = time.perf_counter()
            page.click(f"tr[data-task='{broken}']")  # the one click
            page.wait_for_selector("#failure[data-layer]")
            layer = page.get_attribute("#failure", "data-layer")
            out["newcomer"] = {"ms": (time.perf_counter() - t0) * 1000, "layer": layer}
        ctx.close()
    return out


def run(work: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    flows = work / "workflows"
    flows.mkdir()
    (flows / "broken.yaml").write_text(INFERENCE_FAILURE_WORKFLOW)
    key, op = f"bk-{uid()}", f"bk-{uid()}"
    server = secure_nats(work / "nats").start()
    env = {"BATON_WORKFLOWS_DIR": str(flows), "BATON_LOG_LEVEL": "WARNING",
           "BATON_API_KEYS": json.dumps({key: "acme", op: "*"})}  # fmt: skip
    stack = LocalStack(server, work / "stack", env=env).start(tool_workers=1)
    refusing = RefusingModelServer()
    try:
        refusing_worker(stack, refusing).wait_ready()
        base = stack.orchestrator.url
        for n in range(LIST_TASKS):
            _submit(base, key, "chat", f"hello {n}")
        research = _submit(base, key, "research", "compare two sorting algorithms")
        broken = _submit(base, key, "broken", "hello")
        for task_id in (research, broken):
            _wait(base, key, task_id)
        with sync_playwright() as pw:
            rounds = [_round(pw, work, base, key, research, broken, i) for i in range(ROUNDS)]
    finally:
        stack.stop()
        server.stop()
        refusing.stop()

    def side(name: str, field: str) -> list[float]:
        return [r[name][field] for r in rounds if r[name][field] is not None]

    summary: dict[str, Any] = {"rounds": ROUNDS, "load_average": os.getloadavg()[0]}
    for page in ("list", "task"):
        tti, bare = side(page, "tti_ms"), side("bare", "load_ms")
        last = rounds[-1][page]
        summary[page] = {
            "transfer_bytes": last["transfer"], "decoded_bytes": last["decoded"],
            "requests": last["requests"], "resources": last["by_type"],
            "tti_ms_p50": round(statistics.median(tti), 1), "tti_ms_p95": round(pct(tti, 0.95), 1),
            "bare_load_ms_p50": round(statistics.median(bare), 1),
            "ratio_p50": round(statistics.median(t / b for t, b in zip(tti, bare, strict=True)), 1),
        }  # fmt: skip
    newcomer = [r["newcomer"]["ms"] for r in rounds]
    summary["newcomer"] = {"clicks_from_list": 1, "layer": rounds[-1]["newcomer"]["layer"],
                           "ms_p50": round(statistics.median(newcomer), 1),
                           "ms_p95": round(pct(newcomer, 0.95), 1)}  # fmt: skip
    summary["chromium"] = CHROMIUM
    return summary


def markdown(r: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {page} | {r[page]['transfer_bytes']:,} | {r[page]['decoded_bytes']:,} | "
        f"{r[page]['requests']} | {r[page]['tti_ms_p50']} | {r[page]['tti_ms_p95']} | "
        f"{r[page]['bare_load_ms_p50']} | {r[page]['ratio_p50']} |"
        for page in ("list", "task")
    )
    n = r["newcomer"]
    return f"""## The run console in headless Chromium (`python -m bench console`)

Debian's Chromium driven by Playwright, a fresh profile per load (cold
cache), {r["rounds"]} rounds, load average {r["load_average"]:.1f}. Weight: every
byte transferred until the page is interactive (navigation and resources,
headers included; the long-lived SSE streams excluded); time to interactive:
the page's `baton-interactive` mark (its first data drawn), against a bare
page of the same server (`/healthz`) loaded in the same round.

| page | sent B | decoded B | requests | TTI p50 ms | TTI p95 ms | bare p50 ms | TTI / bare |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

Naming the failed layer of a broken task (an inference-layer failure) from
the list: **{n["clicks_from_list"]} click** on its row; the layer
(`{n["layer"]}`) is highlighted {n["ms_p50"]} ms (p50; p95 {n["ms_p95"]} ms)
after the click.
"""
