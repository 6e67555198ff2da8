"""A real headless browser for the run console: Debian's ``chromium``
(``make system-deps`` / ``.ci/run`` install it) driven by Playwright for
Python — never ``playwright install``: the browser is the system's. Each
test gets a fresh profile (its own user-data-dir: no cookie carried over).
Screenshots go to ``.artifacts/console/`` (git-ignored) or
``$BATON_SCREENSHOTS``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.dev import testing
from tests.console_stack import ConsoleEnv, start_console_env

CHROMIUM = os.environ.get("BATON_CHROMIUM", testing.CHROMIUM)
SHOTS = Path(os.environ.get("BATON_SCREENSHOTS", Path(__file__).parents[2] / ".artifacts/console"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/browser" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    """Playwright's sync API runs an event loop of its own while it is open:
    only for this module, never beside the other tests' asyncio loop."""
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}: `make system-deps` installs Debian's")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleEnv]:
    yield from start_console_env(tmp_path_factory.mktemp("console-browser"))


@pytest.fixture
def browser_for(playwright: Any, env: ConsoleEnv, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``browser_for(tenant)``: a page in a fresh browser profile, logged in
    the way a headless browser does it (a one-time link, as `baton console`
    prints); ``login=False``: not logged in."""
    contexts: list[Any] = []

    def open_page(tenant: str | None = None, *, login: bool = True) -> Any:
        profile = tmp_path / f"profile-{len(contexts)}"
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=list(testing.CHROMIUM_ARGS),
            viewport={"width": 1400, "height": 900},
        )  # fmt: skip
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.pages[0] if context.pages else context.new_page()
        if login and tenant is not None:
            status, doc, _ = env.call("POST", "/ui/login-link", key=env.keys[tenant])
            assert status == 200, doc
            page.goto(f"{env.url}{doc['path']}")
            page.click("#continue")  # the link's page: one click uses it
        else:
            page.goto(f"{env.url}/ui/")
        page.wait_for_selector("body[data-ready]")
        return page

    yield open_page
    for context in contexts:
        context.close()


def shot(page: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
