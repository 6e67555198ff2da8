"""The run console's doors, over HTTP (the page itself is driven by a real
browser in tests/browser): a login link works once (a GET only shows its
page: a link scanner does not use it up) and gives an HttpOnly,
SameSite=Strict session; the session reaches only its key's tenant, needs
its CSRF token to change anything and cannot be used cross-site; it holds
on another replica with the same keys and ends when its key is removed; the
list feed shows a tenant its own tasks only; ``baton console`` prints a
link that logs in."""

from __future__ import annotations

import http.cookies
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton import sessions as S
from tests.console_stack import ConsoleEnv, start_console_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleEnv]:
    yield from start_console_env(tmp_path_factory.mktemp("console"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def _raw(url: str, *, method: str = "GET", data: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:  # fmt: skip
    """A request that does not follow redirects: (status, headers, body)."""
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, data, headers or {}, method=method)
    try:
        with opener.open(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _token(path: str) -> bytes:
    """The form body that uses a login link (its page posts the token)."""
    return urllib.parse.urlencode({"token": path.split("token=", 1)[1]}).encode()


def _login(env: ConsoleEnv, tenant: str, url: str | None = None) -> tuple[str, str]:
    """Log in by link; returns (the cookie header value, the CSRF token)."""
    base = url or env.url
    status, doc, _ = env.call("POST", "/ui/login-link", key=env.keys[tenant])
    assert status == 200, doc
    status, headers, _ = _raw(f"{base}/ui/login", method="POST", data=_token(doc["path"]))
    assert status == 303 and headers["Location"] == "/ui/"
    cookie = http.cookies.SimpleCookie(headers["Set-Cookie"])[S.COOKIE]
    jar = f"{S.COOKIE}={cookie.value}"
    status, _, body = _raw(f"{base}/ui/session", headers={"Cookie": jar})
    assert status == 200
    return jar, json.loads(body)["csrf"]


def test_a_login_link_works_once_and_gives_an_httponly_strict_session(env: ConsoleEnv) -> None:
    status, doc, _ = env.call("POST", "/ui/login-link", key=env.keys["acme"])
    assert status == 200 and doc["path"].startswith("/ui/login?token=")
    for _ in range(2):  # a GET (a link scanner, a prefetch) shows the page, uses nothing
        status, headers, page = _raw(f"{env.url}{doc['path']}")
        assert status == 200 and b"tenant acme" in page and "Set-Cookie" not in headers
        assert b'<form method="post" action="/ui/login">' in page
    status, headers, _ = _raw(f"{env.url}/ui/login", method="POST", data=_token(doc["path"]))
    assert status == 303 and headers["Location"] == "/ui/"
    set_cookie = headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Path=/" in set_cookie
    again = _raw(f"{env.url}/ui/login", method="POST", data=_token(doc["path"]))
    assert again[0] == 303 and again[1]["Location"] == "/ui/?login=used"  # once only
    assert "Set-Cookie" not in again[1]
    forged = doc["path"][:-3] + ("AAA" if not doc["path"].endswith("AAA") else "BBB")
    assert _raw(f"{env.url}{forged}")[1]["Location"] == "/ui/?login=expired"
    forged_post = _raw(f"{env.url}/ui/login", method="POST", data=_token(forged))
    assert forged_post[1]["Location"] == "/ui/?login=expired"
    # Without a valid key there is no link.
    assert env.call("POST", "/ui/login-link", key="bk-wrong")[0] == 401
    assert env.call("POST", "/ui/login-link")[0] == 401


def test_a_pasted_key_logs_in_and_a_wrong_one_does_not(env: ConsoleEnv) -> None:
    form = f"key={env.keys['globex']}".encode()
    status, headers, _ = _raw(f"{env.url}/ui/login", method="POST", data=form,
                              headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert status == 303 and S.COOKIE in headers["Set-Cookie"]
    status, headers, _ = _raw(f"{env.url}/ui/login", method="POST", data=b"key=bk-nope",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert headers["Location"] == "/ui/?login=refused" and "Set-Cookie" not in headers
    # A login form posted from another site is refused.
    status, _, _ = _raw(f"{env.url}/ui/login", method="POST", data=form,
                        headers={"Origin": "https://evil.example"})  # fmt: skip
    assert status == 403


def test_a_session_sees_its_tenant_only_and_changes_nothing_without_its_csrf_token(
    env: ConsoleEnv,
) -> None:
    mine = env.submit("acme", "ask", "draft a note")  # waits for input: running
    theirs = env.submit("globex", "chat", "hello")
    env.wait("acme", mine, lambda d: "r1.confirm" in d["steps"])
    jar, csrf = _login(env, "acme")
    assert _raw(f"{env.url}/v1/tasks/{mine}", headers={"Cookie": jar})[0] == 200
    assert _raw(f"{env.url}/v1/tasks/{theirs}", headers={"Cookie": jar})[0] == 404
    assert _raw(f"{env.url}/ui/api/tasks/{theirs}", headers={"Cookie": jar})[0] == 404
    listed = json.loads(_raw(f"{env.url}/v1/tasks?tenant=globex", headers={"Cookie": jar})[2])
    assert {t["tenant"] for t in listed["tasks"]} == {"acme"}  # the cookie's scope wins
    cancel = f"{env.url}/v1/tasks/{mine}/cancel"
    assert _raw(cancel, method="POST", headers={"Cookie": jar})[0] == 403  # no CSRF token
    assert _raw(cancel, method="POST", headers={"Cookie": jar, S.CSRF_HEADER: "x" + csrf})[0] == 403
    cross = {"Cookie": jar, S.CSRF_HEADER: csrf, "Origin": "https://evil.example"}
    assert _raw(cancel, method="POST", headers=cross)[0] == 403
    status, _, body = _raw(cancel, method="POST", headers={"Cookie": jar, S.CSRF_HEADER: csrf,
                                                           "Origin": env.url})  # fmt: skip
    assert status == 200 and json.loads(body)["status"] == "cancelled"


def test_a_session_holds_on_another_replica_and_ends_when_its_key_is_removed(
    env: ConsoleEnv,
) -> None:
    jar, _ = _login(env, "acme")
    keys = json.dumps({key: tenant for tenant, key in env.keys.items()})
    replica = env.stack.service("orchestrator", BATON_API_KEYS=keys).wait_ready()
    without = {key: tenant for tenant, key in env.keys.items() if tenant != "acme"}
    removed = env.stack.service("orchestrator", BATON_API_KEYS=json.dumps(without)).wait_ready()
    try:
        assert _raw(f"{replica.url}/ui/session", headers={"Cookie": jar})[0] == 200
        assert _raw(f"{replica.url}/v1/tasks", headers={"Cookie": jar})[0] == 200
        assert _raw(f"{removed.url}/ui/session", headers={"Cookie": jar})[0] == 401
        assert _raw(f"{removed.url}/v1/tasks", headers={"Cookie": jar})[0] == 401
        # A link asked of one replica is taken by another, and only once in all.
        _, doc, _ = env.call("POST", "/ui/login-link", key=env.keys["acme"])
        use = _token(doc["path"])
        assert _raw(f"{replica.url}/ui/login", method="POST", data=use)[1]["Location"] == "/ui/"
        assert _raw(f"{env.url}/ui/login", method="POST", data=use)[1]["Location"] == (
            "/ui/?login=used")  # fmt: skip
    finally:
        env.stack.retire(replica)
        env.stack.retire(removed)


def test_the_list_feed_shows_a_tenant_its_own_changes_live(env: ConsoleEnv) -> None:
    jar, _ = _login(env, "globex")
    req = urllib.request.Request(f"{env.url}/ui/api/feed", headers={"Cookie": jar})
    with urllib.request.urlopen(req, timeout=30) as stream:
        time.sleep(0.5)  # the feed follows new events only
        env.submit("acme", "chat", "not for globex")
        mine = env.submit("globex", "chat", "for globex")
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = stream.readline().decode().strip()
            if line.startswith("data:"):
                seen.append(json.loads(line[5:]))
                if any(t["task_id"] == mine and t["status"] == "completed" for t in seen):
                    break
    assert any(t["task_id"] == mine and t["status"] == "completed" for t in seen), seen
    assert {t["tenant"] for t in seen} == {"globex"}


def test_an_operator_lists_every_tenant_or_one(env: ConsoleEnv) -> None:
    env.submit("acme", "chat", "a")
    env.submit("globex", "chat", "b")
    time.sleep(0.5)
    status, doc, _ = env.call("GET", "/v1/tasks?limit=200", key=env.keys["*"])
    assert status == 200 and {"acme", "globex"} <= {t["tenant"] for t in doc["tasks"]}
    status, doc, _ = env.call("GET", "/v1/tasks?tenant=globex", key=env.keys["*"])
    assert {t["tenant"] for t in doc["tasks"]} == {"globex"}
    status, doc, _ = env.call("GET", "/v1/tasks?tenant=globex", key=env.keys["acme"])
    assert {t["tenant"] for t in doc["tasks"]} == {"acme"}


def test_the_page_is_served_from_the_package_with_a_strict_policy(env: ConsoleEnv) -> None:
    status, headers, body = _raw(f"{env.url}/ui/")
    assert status == 200 and b"/ui/static/console.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b"http" not in body.replace(b"http-equiv", b"")  # nothing from another origin
    for name in ("console.js", "console.css"):
        assert _raw(f"{env.url}/ui/static/{name}")[0] == 200


def test_baton_console_prints_a_link_that_logs_in(env: ConsoleEnv, tmp_path: Path) -> None:
    key_file = tmp_path / "tenants" / "acme.key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(env.keys["acme"] + "\n")
    out = subprocess.run([sys.executable, "-m", "baton.cli", "console", "--tenant", "acme",
                          "--api-url", env.url], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "BATON_DATA_DIR": str(tmp_path)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    link = out.stdout.strip()
    assert link.startswith(f"{env.url}/ui/login?token=login.")
    assert _raw(link)[0] == 200  # its page; one click uses it
    status, headers, _ = _raw(f"{env.url}/ui/login", method="POST", data=_token(link))
    assert status == 303 and headers["Location"] == "/ui/" and S.COOKIE in headers["Set-Cookie"]


def test_without_keys_the_console_is_open_and_still_refuses_other_sites(stack: Any) -> None:
    """The shared stack runs without API keys (BATON_ALLOW_NO_API_KEYS)."""
    base = stack.orchestrator.url
    status, _, body = _raw(f"{base}/ui/session")
    assert status == 200 and json.loads(body)["auth"] == "open"
    status, _, body = _raw(f"{base}/ui/login-link", method="POST", data=b"")
    assert status == 200 and json.loads(body)["path"] == "/ui/"
    cancel = f"{base}/v1/tasks/nope/cancel?tenant=acme"
    assert _raw(cancel, method="POST", headers={"Origin": "https://evil.example"})[0] == 403
    assert _raw(cancel, method="POST", headers={"Origin": base})[0] == 404  # same site: on
