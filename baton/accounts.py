"""Who may do what on the bus: NATS accounts, identities and permissions.

Pure: renders the operator-mode nats-server configuration (account JWTs) and
each identity's ``.creds`` from the tenants and the deployment's nkeys, for
every deployment; ``baton.credentials`` keeps the keys, ``baton.natsd`` runs
the server. The accounts, imports and exports: docs/security.md, "Tenants are
NATS accounts"."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from baton import jwt
from proto import streams, subjects
from proto.ids import require_id
from proto.streams import BucketSpec

BATON_ACCOUNT: Final = "BATON"
SYSTEM_ACCOUNT: Final = "SYS"
OPERATOR: Final = "operator"
SYSTEM_USER: Final = "system"

ORCHESTRATOR: Final = "orchestrator"
CONTEXT_STORE: Final = "context-store"
INFERENCE_WORKER: Final = "inference-worker"
TOOL_WORKER: Final = "tool-worker"
SERVICES: Final = (ORCHESTRATOR, CONTEXT_STORE, INFERENCE_WORKER, TOOL_WORKER)

MAX_DELIVERIES: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"

RESERVED: Final = frozenset({BATON_ACCOUNT, SYSTEM_ACCOUNT, "$G", "$SYS"})

# What a tenant publishes into BATON (``<root>.<token>`` in its account,
# ``<root>.<tenant>.<token>`` in BATON's), and the feeds BATON publishes per
# tenant (``<root>.<tenant>.>``) that the tenant imports and subscribes to.
TENANT_SUBMITS: Final = (subjects.TASKS, subjects.INPUT, subjects.DOCUMENTS)
TENANT_FEEDS: Final = (subjects.EVENTS, subjects.TOKENS)
# A tenant's own JetStream holds its copy of its events and token deltas;
# Baton creates them.
TENANT_STREAMS: Final = (streams.EVENTS.name, streams.TOKENS.name)
TENANT_JS_LIMITS: Final = {
    "max_file": 1 << 30,
    "max_mem": 0,
    "max_streams": 4,
    "max_consumers": 1000,
}

_JS_READ_VERBS = ("STREAM.INFO", "STREAM.MSG.GET", "DIRECT.GET", "CONSUMER.INFO")
_JS_DEFINE_VERBS = ("CONSUMER.CREATE", "CONSUMER.DURABLE.CREATE", "CONSUMER.DELETE")
_JS_CONSUME_VERBS = ("CONSUMER.MSG.NEXT",)
_JS_OWN_VERBS = ("STREAM.CREATE", "STREAM.UPDATE")
_JS_ERASE_VERBS = ("STREAM.PURGE", "STREAM.MSG.DELETE")


def inbox_prefix(user: str) -> str:
    """The inbox prefix a Baton service connects with: replies to one service
    are invisible to the others (tenants keep the default ``_INBOX``)."""
    return f"_INBOX_{user}"


def tenant_api_prefix(tenant: str) -> str:
    """How BATON addresses a tenant account's JetStream API."""
    return f"$JS.{require_id(tenant, 'tenant')}.API"


def check_tenant(tenant: str) -> str:
    """A tenant id that can also be an account name."""
    require_id(tenant, "tenant")
    if tenant in RESERVED or tenant.upper() in RESERVED:
        raise ValueError(f"tenant {tenant!r} is a reserved account name")
    return tenant


@dataclass(frozen=True)
class StreamAccess:
    """What an identity may do with one stream's JetStream API."""

    stream: str
    own: bool = False  # create / update it
    define: bool = False  # create / delete consumers
    consume: bool = False  # consumers, fetches and acks
    erase: bool = False  # purge and (secure) delete messages

    def subjects(self, api: str = "$JS.API") -> list[str]:
        verbs = list(_JS_READ_VERBS)
        if self.own:
            verbs += _JS_OWN_VERBS
        if self.define or self.consume:
            verbs += _JS_DEFINE_VERBS
        if self.consume:
            verbs += _JS_CONSUME_VERBS
        if self.erase:
            verbs += _JS_ERASE_VERBS
        out = []
        for verb in verbs:
            out += [f"{api}.{verb}.{self.stream}", f"{api}.{verb}.{self.stream}.>"]
        if self.define or self.consume:
            out += [f"{api}.CONSUMER.NAMES.{self.stream}", f"{api}.CONSUMER.LIST.{self.stream}"]
        if self.consume:
            out += [f"$JS.ACK.{self.stream}.>", f"$JS.FC.{self.stream}.>"]
        return out


@dataclass(frozen=True)
class Role:
    """A service identity's permissions inside the BATON account."""

    user: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    streams: tuple[StreamAccess, ...] = ()
    tenant_streams: tuple[StreamAccess, ...] = ()  # in every tenant account
    buckets: tuple[BucketSpec, ...] = ()
    responds: bool = False  # answers requests (core request-reply)

    def permissions(self, tenants: Sequence[str]) -> dict[str, Any]:
        pub = ["$JS.API.INFO", "$JS.API.STREAM.NAMES", *self.publish]
        for access in self.streams:
            pub += access.subjects()
        for bucket in self.buckets:
            pub += StreamAccess(bucket.stream, own=True, consume=True, erase=True).subjects()
            pub.append(bucket.subject())
        for tenant in tenants:
            api = tenant_api_prefix(tenant)
            pub.append(f"{api}.INFO")
            for access in self.tenant_streams:
                pub += access.subjects(api)
        sub = [f"{inbox_prefix(self.user)}.>", *self.subscribe]
        perms: dict[str, Any] = {"publish": {"allow": _unique(pub)}, "subscribe": {"allow": sub}}
        if self.responds:
            perms["allow_responses"] = True
        return perms


def _ctx(*ops: str) -> tuple[str, ...]:
    return tuple(f"{subjects.CONTEXT_API}.{op}.*" for op in ops)


def service_roles(tenants: Sequence[str], regions: Sequence[str] = ()) -> dict[str, Role]:
    """Least privilege per service (the table in ``docs/security.md``).
    ``regions``: those whose own context streams the context store keeps
    (``proto.streams.context_home``), by name: a permission's ``*`` is a
    whole subject token, never part of a stream's name."""
    task_streams = tuple(
        StreamAccess(streams.tenant_tasks(t).name, own=True, consume=True, erase=True)
        for t in tenants
    )
    regional = tuple(
        StreamAccess(spec.name, own=True, consume=True, erase=True)
        for r in sorted(set(regions))
        for spec in (streams.context_home(r).log, streams.context_home(r).attachments)
    )
    dlq = StreamAccess(streams.DEAD_LETTERS.name, own=True)
    return {
        ORCHESTRATOR: Role(
            ORCHESTRATOR,
            publish=(
                f"{subjects.TASKS}.*.*",  # the HTTP API submits for its key's tenant
                f"{subjects.INPUT}.*.*",  # ... and answers input steps
                f"{subjects.EVENTS}.>",
                f"{subjects.TOKENS}.>",
                f"{subjects.JOBS}.>",
                f"{subjects.TIMERS}.>",
                f"{subjects.CANCEL}.>",
                f"{subjects.DEAD_LETTERS}.>",
                f"{subjects.AUDIT}.>",
                f"{subjects.TOOLS}.>",
                f"{subjects.DOCUMENTS}.>",  # the HTTP API's uploads for its key's tenant
                f"{subjects.ORCHESTRATOR_LOAD}.*",  # its load beacon, for the others' lending
                *_ctx("append", "fork", "window", "get"),
            ),
            subscribe=(
                f"{subjects.HEARTBEATS}.>",
                f"{subjects.ORCHESTRATOR_LOAD}.*",
                f"{MAX_DELIVERIES}.>",
            ),
            streams=(
                *task_streams,
                StreamAccess(streams.RESULTS.name, own=True, consume=True, erase=True),
                StreamAccess(streams.EVENTS.name, own=True, consume=True, erase=True),
                StreamAccess(streams.TOKENS.name, own=True, consume=True, erase=True),
                StreamAccess(streams.TIMERS.name, own=True, consume=True, erase=True),
                StreamAccess(streams.ERASURES.name, own=True, consume=True),
                StreamAccess(streams.AUDIT.name, own=True),
                StreamAccess(streams.TOOLS.name, own=True, define=True),
                StreamAccess(streams.TOOL_RESULTS.name, own=True, consume=True, erase=True),
                StreamAccess(streams.DOCUMENTS.name, own=True),
                # it defines the pool's consumer, so jobs wait for a worker
                StreamAccess(streams.JOBS.name, own=True, define=True),
                StreamAccess(streams.DEAD_LETTERS.name, own=True, consume=True, erase=True),
            ),
            tenant_streams=tuple(StreamAccess(s, own=True, erase=True) for s in TENANT_STREAMS),
            buckets=(streams.RUNS, streams.TOOL_CATALOG, streams.TENANTS),
        ),
        CONTEXT_STORE: Role(
            CONTEXT_STORE,
            publish=(
                f"{subjects.CONTEXT_LOG}.>",
                f"{subjects.CONTEXT_ATTACHMENTS}.>",
                # each region's own history and attachments (the streams
                # that capture them are listed, region by region, below)
                f"{streams.regional_root('*', subjects.CONTEXT_LOG)}.>",
                f"{streams.regional_root('*', subjects.CONTEXT_ATTACHMENTS)}.>",
                f"{subjects.CONTEXT_INVALIDATE}.>",
                # a job's result and last token delta, a tool call's result,
                # each with its answer (``answer``)
                f"{subjects.RESULTS}.>",
                f"{subjects.TOKENS}.>",
                f"{subjects.TOOL_RESULTS}.>",
                f"{subjects.DEAD_LETTERS}.>",
                f"{subjects.ERASED}.>",
                f"{subjects.AUDIT}.>",
                f"{subjects.DOCUMENTS_ERASED}.>",
            ),
            subscribe=(f"{subjects.CONTEXT_API}.*.*", f"{subjects.CONTEXT_INVALIDATE}.*"),
            streams=(
                StreamAccess(streams.CONTEXT.name, own=True, consume=True, erase=True),
                StreamAccess(streams.CONTEXT_ATTACHMENTS.name, own=True, consume=True, erase=True),
                *regional,
                # reads and follows the tenant registry (each tenant's region), never writes it
                StreamAccess(streams.TENANTS.stream, consume=True),
                StreamAccess(streams.ERASURES.name, own=True),
                StreamAccess(streams.AUDIT.name, own=True, consume=True),  # the operator's trail
                StreamAccess(streams.DOCUMENTS.name, own=True, consume=True, erase=True),
                dlq,
            ),
            responds=True,
        ),
        INFERENCE_WORKER: Role(
            INFERENCE_WORKER,
            publish=(
                f"{subjects.RESULTS}.>",
                f"{subjects.TOKENS}.>",
                f"{subjects.JOBS}.>",  # forwards prompts too long for its pool
                f"{subjects.HEARTBEATS}.>",
                f"{subjects.DEAD_LETTERS}.>",
                *_ctx("window", "answer"),
            ),
            subscribe=(f"{subjects.CANCEL}.>", f"{subjects.HEARTBEATS}.>"),
            streams=(
                StreamAccess(streams.JOBS.name, own=True, consume=True),
                StreamAccess(streams.RESULTS.name, own=True),
                StreamAccess(streams.TOKENS.name, own=True),
                dlq,
            ),
        ),
        TOOL_WORKER: Role(
            TOOL_WORKER,
            publish=(
                f"{subjects.TOOL_RESULTS}.>",  # a result stored before, again
                f"{subjects.DEAD_LETTERS}.>",
                *_ctx("window", "answer", "attach"),
            ),
            subscribe=(f"{subjects.DOCUMENTS_ERASED}.*", f"{subjects.CANCEL}.>"),
            streams=(
                StreamAccess(streams.TOOLS.name, own=True, consume=True),
                StreamAccess(streams.TOOL_RESULTS.name, own=True),
                StreamAccess(streams.DOCUMENTS.name, own=True, consume=True),  # the search index
                dlq,
            ),
            buckets=(streams.TOOL_CATALOG,),
        ),
    }


def tenant_permissions(tenant: str) -> dict[str, Any]:
    """A tenant's client: submit tasks, read (live and replay) its own events
    and token deltas. Its JetStream API reaches only its own account."""
    api = "$JS.API"
    pub = [*(f"{root}.*" for root in TENANT_SUBMITS), f"{api}.INFO", f"{api}.STREAM.NAMES"]
    for stream in TENANT_STREAMS:
        pub += [
            f"{api}.STREAM.INFO.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.INFO.{stream}.>",
            f"{api}.CONSUMER.DELETE.{stream}.>",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
            f"{api}.DIRECT.GET.{stream}",
            f"{api}.DIRECT.GET.{stream}.>",
            f"{api}.STREAM.MSG.GET.{stream}",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    sub = [*(f"{root}.{tenant}.>" for root in TENANT_FEEDS), "_INBOX.>"]
    return {"publish": {"allow": pub}, "subscribe": {"allow": sub}}


@dataclass(frozen=True)
class Var:
    """A ``$NAME`` reference nats-server resolves from its environment at
    start, so a secret never sits in the configuration file."""

    name: str


def to_conf(value: Any, indent: int = 0) -> str:
    """Serialise a configuration (dicts, lists, str, int, bool, ``Var``) in
    nats-server's own format."""
    pad = "  " * (indent + 1)
    if isinstance(value, Var):
        return f"${value.name}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        body = "".join(
            f"{pad}{json.dumps(str(k))}: {to_conf(v, indent + 1)}\n" for k, v in value.items()
        )
        return "{\n" + body + "  " * indent + "}"
    if isinstance(value, list | tuple):
        body = "".join(f"{pad}{to_conf(v, indent + 1)}\n" for v in value)
        return "[\n" + body + "  " * indent + "]"
    raise TypeError(f"cannot render {type(value).__name__} in a nats-server config")


def to_conf_entries(config: Mapping[str, Any]) -> str:
    """A configuration's top-level entries without the enclosing braces: a
    file another configuration ``include``s."""
    return "".join(f"{json.dumps(str(k))}: {to_conf(v)}\n" for k, v in config.items())


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def identities(tenants: Sequence[str]) -> list[str]:
    """Every identity with a user (and a ``.creds`` file): services, operator,
    system, tenants."""
    return [*SERVICES, OPERATOR, SYSTEM_USER, *tenants]


# -- operator mode: the same accounts as JWTs ---------------------------------

BATON_JS_LIMITS: Final = {"disk_storage": -1, "mem_storage": -1, "streams": -1, "consumer": -1}
RESOLVER_TIMEOUT: Final = "200ms"
MAX_CONTROL_LINE: Final = 1 << 18  # an unknown account's user is refused after this


OPERATOR_SIGNER: Final = "operator"
"""``Keys.signing``'s name for the operator's signing key."""


class MissingKey(KeyError):
    """A JWT needs a key this directory does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Keys:
    """The nkeys of a deployment: the operator's, one per account (``BATON``,
    ``SYS``, each tenant) and one per user (services, ``operator``,
    ``system``, tenants); the signing keys (``signing``: the operator's,
    ``OPERATOR_SIGNER``, and ``BATON``'s), listed in the operator's and
    BATON's JWTs. A tenant-admin bundle holds no operator, ``BATON`` or
    ``SYS`` identity key: ``publics`` names those holders (``operator`` and
    account names) by public key, and their JWTs are signed with the
    signing keys."""

    operator: jwt.Key | None
    accounts: Mapping[str, jwt.Key]
    users: Mapping[str, jwt.Key]
    signing: Mapping[str, jwt.Key] = field(default_factory=dict)
    publics: Mapping[str, str] = field(default_factory=dict)

    def account(self, name: str) -> str:
        """An account's public key: its name on the server."""
        key = self.accounts.get(name)
        if key is not None:
            return key.public
        if name in self.publics:
            return self.publics[name]
        raise MissingKey(f"no key of account {name!r}")

    def operator_signer(self) -> jwt.Key:
        """What signs account JWTs: the operator's identity key, else its
        signing key (a tenant-admin bundle)."""
        if self.operator is not None:
            return self.operator
        if OPERATOR_SIGNER in self.signing:
            return self.signing[OPERATOR_SIGNER]
        raise MissingKey("neither the operator's key nor its signing key")

    def account_signer(self, name: str) -> tuple[jwt.Key, str | None]:
        """What signs the users of account ``name``, and the ``issuer_account``
        their JWTs then name (None: signed by the account's own key)."""
        if name in self.accounts:
            return self.accounts[name], None
        if name in self.signing:
            return self.signing[name], self.account(name)
        raise MissingKey(f"neither the key of account {name!r} nor its signing key")

    def signing_keys(self, holder: str) -> list[str]:
        """The public signing keys ``holder``'s JWT lists (``OPERATOR_SIGNER``
        or an account name)."""
        key = self.signing.get(holder)
        return [key.public] if key is not None else []


def tenant_limits() -> dict[str, int]:
    """A tenant account's JetStream limits, as the account JWT carries them."""
    lim = TENANT_JS_LIMITS
    return {"disk_storage": lim["max_file"], "mem_storage": lim["max_mem"],
            "streams": lim["max_streams"], "consumer": lim["max_consumers"]}  # fmt: skip


def baton_account_jwt(
    keys: Keys, tenants: Sequence[str], revocations: Mapping[str, int] | None = None
) -> str:
    """BATON's account JWT. Its exports are not pinned (in operator mode a
    pinned token is the importer's public key, not its name): the tenant
    token comes from each tenant's import, which only the operator signs."""
    exports = [
        *({"name": root, "type": "service", "subject": f"{root}.*.*"} for root in TENANT_SUBMITS),
        *({"name": root, "type": "stream", "subject": f"{root}.*.>"} for root in TENANT_FEEDS),
    ]
    imports = [{"name": f"js-{t}", "type": "service", "account": keys.account(t),
                "subject": "$JS.API.>", "local_subject": f"{tenant_api_prefix(t)}.>"}
               for t in tenants]  # fmt: skip
    return jwt.account_jwt(keys.operator_signer(), keys.account(BATON_ACCOUNT), BATON_ACCOUNT,
                           jetstream=dict(BATON_JS_LIMITS), exports=exports,
                           imports=imports, revocations=dict(revocations or {}),
                           signing_keys=keys.signing_keys(BATON_ACCOUNT))  # fmt: skip


def tenant_account_jwt(
    keys: Keys, tenant: str, *, suspended: bool = False,
    revocations: Mapping[str, int] | None = None,
) -> str:  # fmt: skip
    """A tenant's account JWT: imports naming the tenant (its submits arrive
    in BATON as ``<root>.<tenant>.<token>``, it sees only its own feeds),
    JetStream within ``TENANT_JS_LIMITS``, its JetStream API exported for
    BATON's import (only the operator can sign an account that imports it)."""
    baton = keys.account(BATON_ACCOUNT)
    imports = [
        *({"name": root, "type": "service", "account": baton, "subject": f"{root}.{tenant}.*",
           "local_subject": f"{root}.*"} for root in TENANT_SUBMITS),
        *({"name": root, "type": "stream", "account": baton, "subject": f"{root}.{tenant}.>"}
          for root in TENANT_FEEDS),
    ]  # fmt: skip
    exports = [{"name": "jetstream", "type": "service", "subject": "$JS.API.>"}]
    return jwt.account_jwt(keys.operator_signer(), keys.account(tenant), tenant,
                           jetstream=tenant_limits(),
                           exports=exports, imports=imports, suspended=suspended,
                           revocations=dict(revocations or {}))  # fmt: skip


def system_account_jwt(keys: Keys) -> str:
    return jwt.account_jwt(keys.operator_signer(), keys.account(SYSTEM_ACCOUNT), SYSTEM_ACCOUNT)


def account_of(identity: str) -> str:
    """The account an identity's user belongs to."""
    if identity in (*SERVICES, OPERATOR):
        return BATON_ACCOUNT
    return SYSTEM_ACCOUNT if identity == SYSTEM_USER else identity


def user_creds(
    keys: Keys, identity: str, tenants: Sequence[str], regions: Sequence[str] = ()
) -> str:
    """The ``.creds`` file of ``identity``: a user JWT with the permissions
    of its role (a service's, a tenant's; every subject of its account for
    the operator and the system user) and its nkey seed. ``regions``: the
    tenants' regions (the context store's regional streams)."""
    roles = service_roles(tenants, regions)
    perms: dict[str, Any] | None
    if identity in roles:
        perms = roles[identity].permissions(tenants)
    elif identity in (OPERATOR, SYSTEM_USER):
        perms = None
    else:
        perms = tenant_permissions(identity)
    signer, issuer = keys.account_signer(account_of(identity))
    user = keys.users[identity]
    token = jwt.user_jwt(signer, user, identity, perms, issuer_account=issuer)
    return jwt.creds(token, user.seed)


def operator_auth(
    tenants: Sequence[str],
    keys: Keys,
    *,
    resolver_dir: str,
    revocations: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """The authentication part of an operator-mode configuration: the
    operator JWT, the system account and the ``full`` resolver (accounts
    pushed, updated and deleted at run time, kept in ``resolver_dir``)
    preloaded with BATON, SYS and ``tenants``. No passwords: every client
    presents a user JWT (``.creds``). ``baton up`` embeds it in its server's
    configuration; compose and Kubernetes include it as ``auth.conf``
    (``baton nats-auth``).

    Raises:
        ValueError: a tenant id that cannot be an account, or a repeated one.
    """
    tenants = [check_tenant(t) for t in tenants]
    if len(set(tenants)) != len(tenants):
        raise ValueError("tenant ids must be unique")
    if keys.operator is None:
        raise MissingKey("the server's configuration needs the operator's identity key")
    preload = {
        keys.account(SYSTEM_ACCOUNT): system_account_jwt(keys),
        keys.account(BATON_ACCOUNT): baton_account_jwt(keys, tenants),
    }
    for t in tenants:
        preload[keys.account(t)] = tenant_account_jwt(
            keys, t, revocations=(revocations or {}).get(t)
        )
    return {
        "operator": jwt.operator_jwt(
            keys.operator, "baton", keys.account(SYSTEM_ACCOUNT), keys.signing_keys(OPERATOR_SIGNER)
        ),
        "system_account": keys.account(SYSTEM_ACCOUNT),
        # A service's user JWT (its permissions) rides in its CONNECT line.
        "max_control_line": MAX_CONTROL_LINE,
        "resolver": {
            "type": "full",
            "dir": resolver_dir,
            "allow_delete": True,
            "timeout": RESOLVER_TIMEOUT,
        },
        "resolver_preload": preload,
    }


def render_operator(
    tenants: Sequence[str],
    keys: Keys,
    *,
    resolver_dir: str,
    host: str = "127.0.0.1",
    port: int = 4222,
    store_dir: str | None = None,
    monitor_port: int | None = None,
    server_name: str = "baton",
    cipher_key: str | Var | None = None,
    tls: Mapping[str, str | bool] | None = None,
    revocations: Mapping[str, Mapping[str, int]] | None = None,
    cluster: Mapping[str, Any] | None = None,
    server_tags: Sequence[str] = (),
) -> dict[str, Any]:
    """The nats-server configuration in operator mode (decentralized
    authentication): the operator JWT, the ``full`` resolver (accounts
    pushed, updated and deleted at run time) preloaded with BATON, SYS and
    ``tenants``. No passwords: every client presents a user JWT (``.creds``).
    ``server_tags`` (``region:eu``): what JetStream placement matches, so a
    tenant's streams can be kept on its region's servers."""
    jetstream = _jetstream(store_dir, cipher_key)
    config: dict[str, Any] = {
        "server_name": server_name,
        "host": host,
        "port": port,
        "jetstream": jetstream,
        **operator_auth(tenants, keys, resolver_dir=resolver_dir, revocations=revocations),
    }
    if monitor_port is not None:
        config["http_port"] = monitor_port
    if tls is not None:
        config["tls"] = dict(tls)
    if cluster is not None:  # every node shares the operator, its accounts and resolver
        config["cluster"] = dict(cluster)
    if server_tags:
        config["server_tags"] = list(server_tags)
    return config


def _jetstream(store_dir: str | None, cipher_key: str | Var | None) -> dict[str, Any]:
    """The server's JetStream block: its store, encrypted at rest when a key is given."""
    jetstream: dict[str, Any] = {}
    if store_dir is not None:
        jetstream["store_dir"] = store_dir
    if cipher_key is not None:
        jetstream["cipher"] = "chachapoly"
        jetstream["key"] = cipher_key
    return jetstream
