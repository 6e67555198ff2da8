"""docs/settings.md is the settings classes, rendered: it names every BATON_*
variable, and each one says what it means."""

from __future__ import annotations

import re

from baton.dev.settings_doc import DOC, REGENERATE, render, service_settings, undocumented
from baton.settings import CommonSettings


def test_the_reference_is_in_step_with_the_settings_classes() -> None:
    assert DOC.read_text() == render(), f"docs/settings.md is out of date: run {REGENERATE}"


def test_every_setting_says_what_it_means() -> None:
    assert undocumented() == [], (
        "give each of these a comment above its field (or Field(description=...)), "
        f"then run {REGENERATE}"
    )


def test_every_variable_of_every_service_is_listed() -> None:
    listed = set(re.findall(r"`(BATON_[A-Z0-9_]+)`", DOC.read_text()))
    classes = [CommonSettings, *(cls for _, cls in service_settings())]
    assert {"inference-worker", "orchestrator", "context-store"} <= {
        n for n, _ in service_settings()
    }
    for cls in classes:
        assert {f"BATON_{name.upper()}" for name in cls.model_fields} <= listed
