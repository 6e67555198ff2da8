"""docs/architecture.md names the services, subjects, context ops and streams
the code defines, no more and no fewer: each table is read from the doc and
held against its source (``baton.stack.MODULES`` and the package's scripts,
the builders of ``proto/subjects.py``, ``proto/streams.py``)."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

from baton.stack import MODULES
from proto import streams, subjects

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}


def section(title: str) -> str:
    """The text of the doc's ``## <title>`` section."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", DOC, re.M | re.S)
    assert match, f"docs/architecture.md has no section {title!r}"
    return match.group(1)


def first_cells(text: str) -> list[str]:
    """The first cell of each row of the section's table (header excluded)."""
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [row.split("|")[1].strip() for row in rows[2:]]


def placeholders(subject: str) -> str:
    """``baton.ctx.<op>.<tenant>`` as its builder makes it from its
    parameters' names: ``baton.ctx.op.tenant``."""
    return subject.replace("<", "").replace(">", "")


def built_subjects() -> dict[str, str]:
    """Every subject builder called with its parameters' names: subject -> builder."""
    out = {}
    for name, fn in inspect.getmembers(subjects, inspect.isfunction):
        if fn.__module__ != subjects.__name__ or name.endswith("_origin"):
            continue  # parsers of a subject, not builders
        params = inspect.signature(fn).parameters
        args = {p: p for p in params}
        if name == "context_api":
            args["op"] = subjects.CONTEXT_OPS[0]
        subject = fn(**args)
        if name == "context_api":
            subject = subject.replace(f".{subjects.CONTEXT_OPS[0]}.", ".op.")
        out[subject] = name
    return out


def test_the_doc_counts_and_lists_the_services_the_stack_runs() -> None:
    count = NUMBERS[len(MODULES)]
    assert DOC.splitlines()[2].startswith(f"Baton is {count} services"), DOC.splitlines()[2]
    assert f"All {count} are stateless" in DOC
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    processes = {
        re.sub(r"`", "", row.split("|")[2].strip())
        for row in section("Services").splitlines()
        if row.startswith("| ") and "`baton-" in row
    }
    expected = {"baton-" + module.split(".")[-1].replace("_", "-") for module in MODULES.values()}
    assert processes == expected
    assert processes <= set(scripts)


def test_the_subjects_table_is_every_subject_the_builders_make() -> None:
    text = section("Subjects")
    rows = {placeholders(re.findall(r"`([^`]+)`", cell)[0]) for cell in first_cells(text)}
    mentioned = {placeholders(s) for s in re.findall(r"`(baton\.[^`]+)`", text)}
    built = built_subjects()
    assert {s for s in built if s not in mentioned} == set(), "builders the doc does not name"
    assert {s for s in rows if s not in built} == set(), "rows no builder makes"


def test_the_context_ops_in_the_doc_are_the_contract_ops() -> None:
    row = next(r for r in section("Subjects").splitlines() if "`baton.ctx.<op>" in r)
    listed = re.search(r"\(([^)]*)\)", row.split("|")[1])
    assert listed is not None
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == set(subjects.CONTEXT_OPS)


def test_the_streams_table_is_every_stream_the_code_defines() -> None:
    names = {re.findall(r"`([^`]+)`", cell)[0] for cell in first_cells(section("Streams"))}
    defined = {spec.name for spec in streams.ALL_STREAMS} | {f"{streams.TASKS_PREFIX}<tenant>"}
    defined |= {f"{streams.CONTEXT_IN}<region>", f"{streams.CONTEXT_ATTACHMENTS_IN}<region>"}
    assert names == defined


def test_the_doc_names_every_module_of_the_door_and_no_other() -> None:
    """The Services section lists ``baton/bus/``'s modules, one concern each:
    a module added, split or removed is named there too."""
    text = section("Services")
    start = text.index("of one concern a module (")
    listed = set(re.findall(r"`(\w+)`", text[start : text.index("whose public surface", start)]))
    modules = {p.stem for p in (ROOT / "baton" / "bus").glob("*.py") if p.stem != "__init__"}
    assert modules <= listed, f"modules the doc does not name: {sorted(modules - listed)}"
    named = {n for n in listed if n.islower()}  # the types it hands back are capitalised
    assert named <= modules, f"modules the doc names that do not exist: {sorted(named - modules)}"
