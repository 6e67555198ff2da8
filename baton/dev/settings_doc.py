"""The settings reference (docs/settings.md), generated from the settings
classes themselves: every ``BATON_*`` variable with its type, default and
meaning. The meaning is the field's ``Field(description=...)`` or the comment
lines right above it (or at the end of its line) in the class's source.

    python -m baton.dev.settings_doc           # rewrite docs/settings.md
    python -m baton.dev.settings_doc --check   # exit 1 if it is out of date

(``make settings-doc`` runs the first.) ``CommonSettings`` is one section;
each service's section lists the fields it adds or whose default it changes.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
import textwrap
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, SecretStr
from pydantic_settings import BaseSettings

from baton.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "settings.md"
SERVICES = ROOT / "services"
REGENERATE = "python -m baton.dev.settings_doc  (or: make settings-doc)"


@dataclass(frozen=True)
class Setting:
    env: tuple[str, ...]
    type: str
    default: str
    meaning: str


def _source_facts(cls: type[BaseSettings]) -> dict[str, tuple[str, str, str]]:
    """Per field defined in ``cls``'s own body: (annotation, default source,
    comment), read from its source."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    (node,) = ast.parse(src).body
    assert isinstance(node, ast.ClassDef)
    facts = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        comment: list[str] = []
        i = stmt.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            comment.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        line = lines[stmt.end_lineno - 1 if stmt.end_lineno else stmt.lineno - 1]
        if "  # " in line:
            comment.append(line.split("  # ", 1)[1].strip())
        default = ast.unparse(stmt.value) if stmt.value is not None else ""
        facts[stmt.target.id] = (ast.unparse(stmt.annotation), default, " ".join(comment))
    return facts


def _render_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, BaseModel):  # a JSON setting with a schema (e.g. TenantLimits)
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value)}`"


def settings_of(cls: type[BaseSettings]) -> list[Setting]:
    """The settings ``cls`` declares in its own body."""
    prefix = cls.model_config.get("env_prefix", "")
    own = _source_facts(cls)
    out = []
    for name, (annotation, default_src, comment) in own.items():
        field = cls.model_fields[name]
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            env = tuple(str(a) for a in alias.choices)
        else:
            env = (f"{prefix}{name}".upper(),)
        meaning = field.description or comment
        if (
            field.default_factory is None
            and default_src
            and "(" in default_src
            and not (default_src.startswith(("Field(", "Path(")))
        ):
            default = f"computed: `{default_src}`"  # e.g. from the host name
        else:
            default = _render_default(field.get_default(call_default_factory=True))
        out.append(Setting(env, annotation, default, meaning))
    return out


def service_settings() -> list[tuple[str, type[CommonSettings]]]:
    """(service, settings class) for every services/<name>/settings.py."""
    found = []
    for path in sorted(SERVICES.glob("*/settings.py")):
        module = importlib.import_module(f"services.{path.parent.name}.settings")
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, CommonSettings)
                and obj is not CommonSettings
                and obj.__module__ == module.__name__
            ):
                found.append((path.parent.name.replace("_", "-"), obj))
    return found


def _table(settings: list[Setting]) -> list[str]:
    rows = ["| variable | type | default | meaning |", "| --- | --- | --- | --- |"]
    for s in settings:
        env = " or ".join(f"`{e}`" for e in s.env)
        kind, meaning = (t.replace("|", "\\|") for t in (s.type, s.meaning))
        rows.append(f"| {env} | `{kind}` | {s.default} | {meaning} |")
    return rows


def render() -> str:
    out = [
        "# Settings reference",
        "",
        "Generated from the settings classes by `python -m baton.dev.settings_doc`",
        "(`make settings-doc`); `tests/test_settings_doc.py` fails when it is out of",
        "date. Every setting is an environment variable. Values of type `dict` or",
        "`list` are JSON. Unset = the setting's absence has its own meaning, given",
        "in its row.",
        "",
        "## Every service",
        "",
        *_table(settings_of(CommonSettings)),
    ]
    for service, cls in service_settings():
        out += ["", f"## {service} (`{cls.__name__}`)", "", *_table(settings_of(cls))]
    return "\n".join(out) + "\n"


def undocumented() -> list[str]:
    """Variables without a meaning (each needs a comment or a description)."""
    missing = []
    groups = [settings_of(CommonSettings)]
    groups += [settings_of(cls) for _, cls in service_settings()]
    for group in groups:
        missing += [s.env[0] for s in group if not s.meaning]
    return missing


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in args:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
