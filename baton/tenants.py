"""Tenants at run time: create, suspend, resume, rotate, delete — no restart
of NATS or of any service. What each step pushes and writes, and why a
deleted account gets a tombstone: docs/security.md, "Tenants at run time";
regions: "Residency"."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from nacl.exceptions import CryptoError

from baton import accounts, jwt, residency, sealing
from baton.bus import Bucket, Bus, WrongLastSequence, connect
from baton.credentials import (
    SECRETS_FILE,
    Credentials,
    creds_path,
    key_path,
    new_secret,
    write_private,
)
from proto import streams, subjects
from proto.messages import ContextDelete, ContextStats, DeleteReply, StatsReply

log = structlog.get_logger("baton.tenants")

ACTIVE: Final = "active"
SUSPENDED: Final = "suspended"
DELETED: Final = "deleted"
STATES: Final = (ACTIVE, SUSPENDED, DELETED)


class TenantError(RuntimeError):
    """A lifecycle step that cannot be done (unknown tenant, exists, refused push)."""


class TenantConflict(TenantError):
    """A step the tenant's state forbids (a tenant that has history or
    attachments is not moved to another region), or one another replica's
    step overtook (a rotation whose registry entry changed meanwhile): HTTP
    409, the CLI exits non-zero."""


class TenantUnavailable(TenantError):
    """A step that needs a service that did not answer (HTTP 503)."""


class AdminKeysError(TenantError):
    """The directory given holds no keys that can run the lifecycle."""


class KeysElsewhere(TenantError):
    """The tenant's own keys are in another copy of the tenant-admin bundle."""


def key_digest(api_key: str) -> str:
    """How the registry names a tenant's HTTP API key (never the key itself)."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh HTTP API key for a tenant (shown once; the registry keeps its digest)."""
    return f"bk-{new_secret()}"


_KEY_FIELDS: Final = ("account", "user", "revocations")
"""A tenant's entries of the secrets file that its registry entry carries sealed."""


def sealing_key(creds: Credentials) -> bytes:
    """The key the registry's tenant keys are sealed under: derived from the
    operator's signing key, which the full keys and every copy of the
    tenant-admin bundle hold (and which can sign any account already)."""
    seed = creds.nkeys[f"signing:{accounts.OPERATOR_SIGNER}"]
    return hmac.new(seed.encode(), b"baton-tenant-keys-v1", hashlib.sha256).digest()


def seal_keys(creds: Credentials, tenant: str) -> str:
    """``tenant``'s seeds and revocations from ``creds``, sealed for its
    registry entry ("" when ``creds`` lacks its account key)."""
    found = {f: creds.nkeys[f"{f}:{tenant}"] for f in _KEY_FIELDS if f"{f}:{tenant}" in creds.nkeys}
    if "account" not in found:
        return ""
    raw = sealing.seal(sealing_key(creds), f"baton-tenant:{tenant}", json.dumps(found).encode())
    return base64.b64encode(raw).decode()


def open_keys(creds: Credentials, tenant: str, sealed: str) -> dict[str, str]:
    """The secrets-file entries (``account:<t>``, ...) sealed in a registry entry.

    Raises:
        KeysElsewhere: they do not open with this deployment's signing key
            (sealed under another one: rotated since).
    """
    try:
        raw = sealing.unseal(sealing_key(creds), f"baton-tenant:{tenant}", base64.b64decode(sealed))
    except (ValueError, CryptoError) as exc:
        why = "do not open with this deployment's operator signing key"
        raise KeysElsewhere(f"the registry's keys of tenant {tenant!r} {why}") from exc
    return {f"{f}:{tenant}": str(v) for f, v in json.loads(raw).items() if f in _KEY_FIELDS}


@dataclass(frozen=True)
class Created:
    """What creating or rotating a tenant hands out: its ``.creds`` file and
    its HTTP API key, which exists nowhere else (only its digest is kept)."""

    creds: Path
    api_key: str = dataclasses.field(repr=False)
    # Where the key is kept too: a BATON_TENANTS tenant rotated in ``baton
    # up``'s data dir (its ``tenants/<t>.key``); None: shown once only.
    key_file: Path | None = None


@dataclass(frozen=True)
class TenantState:
    tenant: str
    state: str
    changed_at: float
    api_key: str = ""  # key_digest of its HTTP API key: the services accept it
    # Where its data lives: its streams are placed on servers tagged
    # ``region:<region>`` (``proto.streams.placed``); "" = anywhere.
    region: str = ""
    # Its account's public key (public data): BATON's account JWT imports its
    # JetStream API by it, so an admin that lacks the tenant's keys (another
    # orchestrator replica's bundle copy) re-issues BATON without dropping it.
    account: str = ""
    # The tenant's account and user seeds and its revocations, sealed
    # (``seal_keys``) under a key derived from the operator's signing key:
    # any orchestrator replica (any copy of the tenant-admin bundle) opens
    # them to rotate the tenant; every other reader of the registry sees
    # ciphertext. docs/security.md, "Tenants at run time".
    keys: str = dataclasses.field(default="", repr=False)

    def encode(self) -> bytes:
        doc = dataclasses.asdict(self)
        del doc["tenant"]  # the entry's key
        return json.dumps(doc).encode()

    @classmethod
    def decode(cls, tenant: str, value: bytes) -> TenantState:
        doc = json.loads(value)
        state = doc.get("state") if doc.get("state") in STATES else ACTIVE
        api_key, region, account, keys = (str(doc.get(f) or "") for f in _TEXT_FIELDS)
        return cls(tenant, state, float(doc.get("changed_at", 0)), api_key, region, account, keys)


_TEXT_FIELDS: Final = ("api_key", "region", "account", "keys")


def live_keys(
    tenant: str, configured: Mapping[str, str], entry: TenantState | None, *, served: bool = True
) -> dict[str, str]:
    """The HTTP API keys a service accepts for ``tenant`` (key or
    ``sha256:`` digest -> tenant): the one rule every service follows.

    ``configured``: the service's BATON_API_KEYS as started (empty: keys
    off, so none); ``entry``: the tenant's registry entry (None: not in
    the registry). A deleted tenant has none; once the registry holds a
    key digest for it (created at run time, or rotated), that digest alone
    — accepted once this service ``served`` the tenant — else its
    configured keys. A suspended tenant keeps its keys: ``caller_scope``
    refuses them with 403 ``tenant_suspended`` (``TenantKeys.suspended``)."""
    if not configured or (entry is not None and entry.state == DELETED):
        return {}
    if entry is not None and entry.api_key:
        return {entry.api_key: tenant} if served else {}
    return {k: t for k, t in configured.items() if t == tenant}


class TenantKeys:
    """A service's live HTTP API keys and suspended tenants, kept by
    ``live_keys`` as the registry's entries arrive."""

    def __init__(self, api_keys: dict[str, str], suspended: set[str]) -> None:
        """``api_keys``: the mapping the HTTP API reads (changed in place);
        ``suspended``: the set it refuses (403)."""
        self.api_keys = api_keys
        self.configured = dict(api_keys)
        self.suspended = suspended

    def apply(self, entry: TenantState, *, served: bool = True) -> None:
        t = entry.tenant
        if entry.state == SUSPENDED:
            self.suspended.add(t)
        else:
            self.suspended.discard(t)
        if not self.configured:
            return
        live = live_keys(t, self.configured, entry, served=served)
        for k in [k for k, v in self.api_keys.items() if v == t and k not in live]:
            del self.api_keys[k]
        self.api_keys.update(live)


async def read_registry(bus: Bus) -> dict[str, TenantState]:
    """Every tenant the registry records (deleted ones included)."""
    registry = await bus.ensure_bucket(streams.TENANTS)
    entries = await registry.entries(patient=True)
    return {e.key: TenantState.decode(e.key, e.value) for e in entries if e.value and not e.deleted}


def account_tenants(creds: Credentials) -> list[str]:
    """The tenants that have an account key (every tenant the server knows)."""
    return creds.tenants()


def _creating(tenant: str) -> str:
    """The secrets file's marker of a create not finished yet (resumed by
    the next ``create``; not listed meanwhile)."""
    return f"creating:{tenant}"


def _revoking(tenant: str) -> str:
    """The secrets file's copy of a deleted tenant's account key, kept until
    its tombstone JWT is pushed (resumed by the next ``delete``)."""
    return f"revoking:{tenant}"


ADMIN_USER: Final = "tenant-admin"
"""The BATON user a bundle's admin mints for itself."""


def check_admin_dir(data_dir: Path) -> Path:
    """``data_dir`` if it can run the tenant lifecycle: it holds the
    operator's identity key, or it is a tenant-admin bundle with the
    operator's and BATON's signing keys and the system user's ``.creds``.

    Raises:
        AdminKeysError: neither, saying what is missing.
    """
    path = Path(data_dir) / SECRETS_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdminKeysError(
            f"no tenant keys in {data_dir} ({path}: {exc}); pass the data dir of "
            "`baton up` or the tenant-admin bundle `baton nats-auth` writes"
        ) from exc
    nkeys = doc.get("nkeys") or {}
    if not doc.get("bundle"):
        if "operator" not in nkeys:
            raise AdminKeysError(
                f"{path} holds neither the operator's key nor a tenant-admin bundle"
            )
        return Path(data_dir)
    wanted = {
        f"signing:{accounts.OPERATOR_SIGNER}": "the operator's signing key",
        f"signing:{accounts.BATON_ACCOUNT}": "BATON's signing key",
        f"public:account:{accounts.BATON_ACCOUNT}": "BATON's public key",
        f"user:{accounts.ORCHESTRATOR}": "the orchestrator's nkey",
    }
    missing = [what for k, what in wanted.items() if k not in nkeys]
    system = creds_path(Path(data_dir), accounts.SYSTEM_USER)
    if not system.exists():
        missing.append(f"the system user's .creds ({system})")
    if missing:
        lacks = f"the tenant-admin bundle {data_dir} lacks {', '.join(missing)}"
        raise AdminKeysError(f"{lacks}: write it again with `baton nats-auth`")
    return Path(data_dir)


def is_bundle(data_dir: Path) -> bool:
    """Whether ``data_dir`` is a tenant-admin bundle (not a full data dir)."""
    try:
        return bool(json.loads((Path(data_dir) / SECRETS_FILE).read_text()).get("bundle"))
    except (OSError, ValueError):
        return False


def reissue_orchestrator(admin_dir: Path, creds_file: Path, tenants: Iterable[str]) -> bool:
    """Re-issue an orchestrator's own ``.creds`` at ``creds_file`` with the
    permissions of ``tenants`` (their task streams, their accounts'
    JetStream), its user JWT signed by BATON's signing key from the
    tenant-admin bundle at ``admin_dir``: each orchestrator replica follows a
    tenant created through another's bundle. False when the file already
    grants all of that (nothing written)."""
    ids = sorted(set(tenants))
    keys = Credentials.load_or_create(admin_dir, []).keys()
    perms = accounts.service_roles(ids)[accounts.ORCHESTRATOR].permissions(ids)
    try:
        now = jwt.decode(jwt.creds_jwt(Path(creds_file).read_text()))["nats"]
        has_pub = set(now.get("pub", {}).get("allow", []))
        has_sub = set(now.get("sub", {}).get("allow", []))
        if has_pub >= set(perms["publish"]["allow"]) and has_sub >= set(
            perms["subscribe"]["allow"]
        ):
            return False
    except (OSError, ValueError, KeyError):
        pass
    write_private(Path(creds_file), accounts.user_creds(keys, accounts.ORCHESTRATOR, ids))
    return True


def _revocations(creds: Credentials, account: str) -> dict[str, int]:
    return creds.revocations(account)


_SET_ATTEMPTS: Final = 5
"""Registry writes a step makes again from the fresh entry before giving up."""


def _overtaken(tenant: str) -> TenantConflict:
    return TenantConflict(
        f"tenant {tenant!r} changed while this step ran (another replica rotated, suspended or "
        "deleted it): nothing was changed here; read its state and run the step again"
    )


class TenantAdmin:
    """Lifecycle steps against the server at ``address`` (``nats://host:port``)."""

    def __init__(self, data_dir: Path, address: str, *, replicas: int = 1) -> None:
        """``data_dir``: a data dir holding the operator's keys (``baton up``),
        or a tenant-admin bundle (``baton nats-auth``'s ``tenant-admin/``).

        Raises:
            AdminKeysError: it holds neither (no keys, or a bundle without
                its signing keys).
        """
        self.data_dir = Path(data_dir)
        self.address = address
        # The services' BATON_STREAM_REPLICAS: the registry bucket it may
        # create must match theirs (a cluster's R3 bucket refuses an R1 create).
        self.replicas = replicas
        self.creds = Credentials.load_or_create(check_admin_dir(self.data_dir), [])
        self.sys: Bus | None = None
        self.op: Bus | None = None
        self._admin_creds: Path | None = None

    async def __aenter__(self) -> TenantAdmin:
        sys_creds = self.creds.creds_path(accounts.SYSTEM_USER)
        self.sys = await connect(self.address, name="baton-tenant-admin-sys", creds=sys_creds)
        op_creds = self.creds.creds_path(accounts.OPERATOR)
        if self.creds.bundle:  # no operator .creds in a bundle: a user of its own
            op_creds = self._admin_creds = self._mint_admin_user()
        try:
            self.op = await connect(
                self.address, name="baton-tenant-admin", replicas=self.replicas, creds=op_creds
            )
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for bus in (self.sys, self.op):
            if bus is not None:
                await bus.close()
        if self._admin_creds is not None:
            self._admin_creds.unlink(missing_ok=True)

    def _mint_admin_user(self) -> Path:
        """A user of BATON for this admin's registry, stream and erasure
        calls, signed by BATON's signing key: a fresh nkey per admin, its
        ``.creds`` (0600, one file per admin: two calls never read each
        other's half-written file) removed on exit."""
        keys = self.creds.keys()
        signer, issuer = keys.account_signer(accounts.BATON_ACCOUNT)
        user = jwt.Key(jwt.new_seed(jwt.USER))
        token = jwt.user_jwt(signer, user, ADMIN_USER, None, issuer_account=issuer)
        name = f"{ADMIN_USER}-{os.getpid()}-{id(self):x}.creds"
        path = self.data_dir / "secrets" / "creds" / name
        write_private(path, jwt.creds(token, user.seed))
        return path

    # -- the registry ----------------------------------------------------------

    async def _registry(self) -> Bucket:
        assert self.op is not None
        return await self.op.ensure_bucket(streams.TENANTS)

    async def _entry(self, tenant: str) -> tuple[TenantState | None, int]:
        """The tenant's registry entry as the stream's leader has it now,
        and its revision (0: none): what a compare-and-set names."""
        found = await (await self._registry()).get(tenant, consistent=True)
        if found is None:
            return None, 0
        return TenantState.decode(tenant, found.value), found.revision

    async def list(self) -> dict[str, str]:
        """tenant -> state, for every tenant the registry or the keys know."""
        registry = await self._registry()
        made = [t for t in account_tenants(self.creds) if _creating(t) not in self.creds.nkeys]
        out = dict.fromkeys(made, ACTIVE)
        for entry in await registry.entries():
            if entry.value and not entry.deleted:
                out[entry.key] = TenantState.decode(entry.key, entry.value).state
        return {t: s for t, s in sorted(out.items()) if s != DELETED}

    async def _set(
        self,
        tenant: str,
        state: str,
        region: str | None = None,
        digest: str | None = None,
        keys: str | None = None,
        *,
        expect: int | None = None,
    ) -> None:
        """Record ``state``; the region stays what it was unless given, so
        do the API key's digest (unless ``digest``: a key just issued), the
        account when this admin lacks it, and the sealed keys (unless
        ``keys``: just made or rotated; an entry without any gets this
        admin's). A tenant of BATON_TENANTS never given a key here keeps the
        digest of its configured key.

        A compare-and-set on the revision read: a write another replica's
        overtook is made again from the fresh entry (suspend, resume, a
        region, delete: what they keep is read again). ``expect``: the
        revision the step was built on (a rotation's keys); a registry that
        moved on since is a conflict, as is a write that loses.

        Raises:
            TenantConflict: ``expect`` is stale, or the entry kept changing.
        """
        registry = await self._registry()
        for _ in range(_SET_ATTEMPTS):
            before, revision = await self._entry(tenant)
            if expect is not None and revision != expect:
                raise _overtaken(tenant)
            entry = self._merged(tenant, state, before, region, digest, keys)
            try:
                if revision:
                    await registry.update(tenant, entry.encode(), revision)
                else:
                    await registry.create(tenant, entry.encode())
                return
            except WrongLastSequence:
                if expect is not None:
                    raise _overtaken(tenant) from None
        raise _overtaken(tenant)

    def _merged(
        self,
        tenant: str,
        state: str,
        before: TenantState | None,
        region: str | None,
        digest: str | None,
        keys: str | None,
    ) -> TenantState:
        """The entry ``_set`` writes over ``before``."""
        kept = before if before is not None and before.state != DELETED else None
        if digest is None:
            digest = kept.api_key if kept else ""
        if not digest and (static := self.creds.api_keys.get(tenant)):
            digest = key_digest(static)
        if region is None:
            region = kept.region if kept else ""
        account = self.creds.nkeys.get(f"account:{tenant}")
        public = jwt.Key(account).public if account else (before.account if before else "")
        if keys is None:
            keys = (kept.keys if kept else "") or seal_keys(self.creds, tenant)
        if state == DELETED:
            digest = keys = ""
        return TenantState(tenant, state, time.time(), digest, region, public, keys)

    async def _accounts(self) -> dict[str, str]:
        """Every live tenant's account public key: from this admin's keys,
        and from the registry for tenants whose keys it lacks (created
        through another copy of the bundle). A tenant the registry says is
        deleted is left out, unless this admin is creating it anew."""
        assert self.op is not None
        registry = await read_registry(self.op)
        out = {t: e.account for t, e in registry.items() if e.state != DELETED and e.account}
        keys = self.creds.keys()
        for t in account_tenants(self.creds):
            entry = registry.get(t)
            if entry is None or entry.state != DELETED or _creating(t) in self.creds.nkeys:
                out[t] = keys.account(t)
        return dict(sorted(out.items()))

    async def _keys(self) -> tuple[accounts.Keys, tuple[str, ...]]:
        """The keys, with the public keys of tenants known from the registry
        only, and every live tenant."""
        known = await self._accounts()
        keys = self.creds.keys()
        extra = {t: pub for t, pub in known.items() if t not in keys.accounts}
        return dataclasses.replace(keys, publics={**keys.publics, **extra}), tuple(known)

    async def state(self, tenant: str) -> str | None:
        return (await self.list()).get(tenant)

    async def region(self, tenant: str) -> str:
        """The tenant's region ("" for none)."""
        assert self.op is not None
        entry = (await read_registry(self.op)).get(tenant)
        return entry.region if entry is not None and entry.state != DELETED else ""

    async def residency(self, tenant: str) -> dict[str, Any]:
        """Where the tenant's data lives (``baton tenant where``, ``GET
        /v1/tenants/<t>/where``): its region, and for each of its streams
        the placement and the servers, with their tags, holding a replica."""
        await self._known(tenant)
        assert self.op is not None and self.sys is not None
        replicas = await residency.where(self.op, tenant)
        tags = await residency.server_tags(self.sys)
        region = await self.region(tenant)
        context = await residency.context_where(self.op, region)
        return residency.report(tenant, region, replicas, tags, context)

    # -- pushes ------------------------------------------------------------------

    async def _push(self, token: str, *, attempts: int = 3) -> None:
        """Send an account JWT to the resolver, again after a request that
        timed out (a cluster electing, a server restarting): idempotent."""
        assert self.sys is not None
        for attempt in range(attempts):
            try:
                raw = await self.sys.request_raw("$SYS.REQ.CLAIMS.UPDATE", token.encode())
                break
            except Exception:
                if attempt + 1 >= attempts:
                    raise
                await asyncio.sleep(1.0)
        answer = json.loads(raw)
        data = answer.get("data") or {}
        if data.get("code") != 200:
            raise TenantError(f"the server refused the account JWT: {answer}")

    async def _push_tenant(self, tenant: str) -> None:
        keys = self.creds.keys()
        token = accounts.tenant_account_jwt(
            keys, tenant, revocations=_revocations(self.creds, tenant)
        )
        await self._push(token)

    def _add_region(self, region: str | None) -> None:
        """A region new to this deployment: recorded, and the context
        store's ``.creds`` re-issued with its streams (the store reconnects
        with them when the registry names the region)."""
        if not region or region in self.creds.regions:
            return
        self.creds.regions.append(region)
        self.creds.save()
        keys = self.creds.keys()
        if accounts.CONTEXT_STORE not in keys.users:  # a tenant-admin bundle
            again = "render the store's .creds again and restart it"
            log.warning("context_store_creds_not_reissued", region=region, detail=again)
            return
        store = accounts.user_creds(
            keys, accounts.CONTEXT_STORE, account_tenants(self.creds), self.creds.regions
        )
        write_private(self.creds.creds_path(accounts.CONTEXT_STORE), store)

    async def _push_baton(self) -> None:
        """BATON's account JWT for the current tenants (its imports of their
        JetStream APIs), after rewriting the orchestrator's ``.creds`` with
        permissions for them: the orchestrator reconnects with it when the
        registry tells it of the change (nats-py re-reads the file)."""
        keys, tenants = await self._keys()
        write_private(
            self.creds.creds_path(accounts.ORCHESTRATOR),
            accounts.user_creds(keys, accounts.ORCHESTRATOR, tenants, self.creds.regions),
        )
        await self._push(accounts.baton_account_jwt(keys, tenants))

    # -- steps -------------------------------------------------------------------

    async def create(self, tenant: str, region: str | None = None) -> Created:
        """A new tenant: its account, its ``.creds`` and URL files, BATON's
        import of its JetStream API, then the registry entry (with its
        ``region``: the orchestrator places its streams there, and with the
        digest of a fresh HTTP API key, returned here and stored nowhere)."""
        accounts.check_tenant(tenant)
        if _revoking(tenant) in self.creds.nkeys:
            raise TenantError(f"tenant {tenant!r} is not deleted yet: run its delete again")
        marker = _creating(tenant)
        if marker not in self.creds.nkeys:  # else: an earlier call failed half-way
            if await self.state(tenant) is not None:
                raise TenantError(f"tenant {tenant!r} exists")
            if region:
                assert self.sys is not None
                await residency.check_region(self.sys, region, self.replicas)
            for stale in (f"account:{tenant}", f"user:{tenant}", f"revocations:{tenant}"):
                self.creds.nkeys.pop(stale, None)
            if tenant in self.creds.deleted:  # made anew: a restart keeps it from now on
                self.creds.deleted.remove(tenant)
            self.creds.add_nkeys([*account_tenants(self.creds), tenant])
            self.creds.api_keys.pop(tenant, None)  # (an older version stored it)
            self.creds.nkeys[marker] = str(int(time.time()))
            self.creds.save()
        # Each step is idempotent: a call that failed (a push timed out in an
        # election) is resumed by calling create again, with the same keys.
        await self._push_tenant(tenant)
        await self._push_baton()
        self._write_files(tenant)
        self._add_region(region)
        api_key = new_api_key()  # (a create resumed issues another: the first was never shown)
        sealed = seal_keys(self.creds, tenant)
        await self._set(tenant, ACTIVE, region or "", digest=key_digest(api_key), keys=sealed)
        del self.creds.nkeys[marker]
        self.creds.save()
        await self.wait_served(tenant)
        return Created(creds_path(self.data_dir, tenant), api_key)

    async def wait_served(self, tenant: str, timeout: float = 30.0) -> None:
        """Until the orchestrator serves ``tenant``: its task stream and
        consumer exist, and its own events and tokens streams for replay.

        Raises:
            TenantError: not within ``timeout`` seconds (is an orchestrator running?).
        """
        assert self.op is not None
        spec = streams.task_consumer(tenant)
        tenant_js = self.op.account(accounts.tenant_api_prefix(tenant))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await self.op.pending(spec)
                for copy in (streams.TENANT_EVENTS, streams.TENANT_TOKENS):
                    await tenant_js.stream_info(copy.name)
                return
            except Exception:
                await asyncio.sleep(0.1)
        raise TenantError(f"no orchestrator served tenant {tenant!r} within {timeout:g} s")

    def _write_files(self, tenant: str) -> None:
        user = accounts.user_creds(self.creds.keys(), tenant, account_tenants(self.creds))
        write_private(creds_path(self.data_dir, tenant), user)
        write_private(self.data_dir / "tenants" / f"{tenant}.url", self.address + "\n")

    async def _delete_streams(self, tenant: str) -> None:
        """Delete the streams only ``tenant``'s data lives in (its task
        stream, its account's events and tokens): their files go with them,
        and nothing of the tenant is left to serve or to find after a
        restart. The orchestrator has stopped pulling (the registry said
        ``deleted``); its erasure of the shared streams goes on."""
        assert self.op is not None
        task, *copies = streams.tenant_streams(tenant)
        tenant_js = self.op.account(accounts.tenant_api_prefix(tenant))
        for bus, spec in [(self.op, task), *((tenant_js, c) for c in copies)]:
            try:
                await bus.delete_stream(spec.name)
            except Exception as exc:  # a fault, its account unreachable: the revocation goes on
                log.warning(
                    "tenant_stream_not_deleted", tenant=tenant, stream=spec.name, error=repr(exc)
                )

    async def _known(self, tenant: str, *, signs: bool = False) -> str:
        """The tenant's state. ``signs``: the step signs for the tenant's
        account (a rotation), so this admin must hold its key (``_adopt``
        it first).

        Raises:
            TenantError: no such tenant.
            KeysElsewhere: ``signs``, and its key is in another copy of the bundle.
        """
        state = await self.state(tenant)
        if state is None:
            raise TenantError(f"no tenant {tenant!r}")
        if f"account:{tenant}" not in self.creds.nkeys:
            if signs:
                raise KeysElsewhere(
                    f"the keys of tenant {tenant!r} are neither in {self.data_dir} nor sealed in "
                    "its registry entry (it was created by an older version through another "
                    "copy of the tenant-admin bundle); rotate it where they are"
                )
            if tenant not in await self._accounts():
                raise TenantError(f"no tenant {tenant!r}")
        return state

    async def _adopt(self, tenant: str) -> int:
        """Take the tenant's keys from its registry entry, where they are
        sealed: they are the latest (another replica may have created or
        rotated the tenant; a pod's copy of the bundle forgets at a restart).
        Returns the entry's revision (0: none), which a step built on these
        keys expects to overwrite."""
        entry, revision = await self._entry(tenant)
        if entry is None or entry.state == DELETED or not entry.keys:
            return revision  # (an entry of an older version: this admin's own keys, if any)
        opened = open_keys(self.creds, tenant, entry.keys)
        if all(self.creds.nkeys.get(k) == v for k, v in opened.items()):
            return revision
        for field in _KEY_FIELDS:
            self.creds.nkeys.pop(f"{field}:{tenant}", None)
        self.creds.nkeys.update(opened)
        self.creds.save()
        return revision

    async def set_region(self, tenant: str, region: str) -> None:
        """Give a tenant (one of BATON_TENANTS, or one created without) a
        region: the orchestrator updates its streams' placement and
        JetStream moves their replicas there (``where`` shows when), and the
        context store writes its sessions to the region's own streams.

        Raises:
            TenantConflict: the tenant has history or attachments, which are
                not migrated to another region's streams (erase them first).
        """
        state = await self._known(tenant)
        assert self.sys is not None
        old = await self.region(tenant)
        if region == old:
            self._add_region(region)  # (a region recorded before the store's .creds named it)
            return
        await self._refuse_if_history(tenant, old)
        await residency.check_region(self.sys, region, self.replicas)
        self._add_region(region)
        await self._set(tenant, state, region)

    async def _refuse_if_history(self, tenant: str, region: str) -> None:
        """Refuse moving a tenant whose sessions or attachments the context
        store holds: they live in its region's streams, and the store reads a
        tenant's history from its current region only. (A turn that ends
        between this check and the registry's change can still write to the
        old region: suspend the tenant first to rule that out.)"""
        assert self.op is not None
        try:
            to = subjects.context_api("stats", tenant)
            reply = await self.op.request(to, ContextStats(tenant=tenant), StatsReply, timeout=10.0)
        except Exception as exc:
            why = f"the context store did not answer ({exc!r})"
            raise TenantUnavailable(f"cannot tell whether {tenant!r} has history: {why}") from exc
        if reply.error is not None:
            raise TenantUnavailable(
                f"the context store could not count {tenant!r}'s history: {reply.error.message}"
            )
        if reply.sessions or reply.attachments:
            raise TenantConflict(
                f"tenant {tenant!r} has {reply.sessions} session(s) and {reply.attachments} "
                f"attachment(s) stored in region {region or '(none)'}: its data is not migrated "
                "to another region; erase its sessions first (docs/security.md, Residency)"
            )

    async def suspend(self, tenant: str) -> None:
        await self._known(tenant)
        await self._set(tenant, SUSPENDED)

    async def resume(self, tenant: str) -> None:
        await self._known(tenant)
        await self._set(tenant, ACTIVE)

    async def rotate(self, tenant: str) -> Created:
        """A new user nkey and a new HTTP API key, recorded in the registry
        by a compare-and-set on the entry the tenant's keys were read from:
        of two replicas rotating at once, one wins and the other changes
        nothing (``TenantConflict``), so one set of keys is live. Then the
        old user is revoked (refused by the server) and the ``.creds``
        written; every orchestrator refuses the old key. (A push that fails
        is finished by rotating again: the registry's keys revoke the old
        user too.)

        Raises:
            TenantConflict: another step changed the tenant meanwhile.
        """
        revision = await self._adopt(tenant)
        state = await self._known(tenant, signs=True)
        fields = (f"revocations:{tenant}", f"user:{tenant}")
        before = {k: self.creds.nkeys[k] for k in fields if k in self.creds.nkeys}
        old = self.creds.keys().users[tenant].public
        revoked = _revocations(self.creds, tenant)
        revoked[old] = int(time.time()) + 1  # every JWT of that key, issued up to now
        self.creds.nkeys[f"revocations:{tenant}"] = json.dumps(revoked)
        self.creds.nkeys[f"user:{tenant}"] = jwt.new_seed(jwt.USER)
        api_key, sealed = new_api_key(), seal_keys(self.creds, tenant)
        try:
            await self._set(tenant, state, digest=key_digest(api_key), keys=sealed, expect=revision)
        except BaseException:  # this admin's keys stay the ones it read
            for k in fields:
                self.creds.nkeys.pop(k, None)
            self.creds.nkeys.update(before)
            raise
        self.creds.save()
        await self._push_tenant(tenant)
        self._write_files(tenant)
        kept = self._replace_configured_key(tenant, api_key)
        return Created(creds_path(self.data_dir, tenant), api_key, kept)

    def _replace_configured_key(self, tenant: str, api_key: str) -> Path | None:
        """A BATON_TENANTS tenant's configured key is refused from now on.
        In ``baton up``'s data dir, which keeps that key (its secrets file
        and ``tenants/<t>.key``), the new key replaces it: a ``baton up``
        restarted configures the key the registry accepts, never the refused
        one. A tenant-admin bundle (a pod's copy) keeps no key: its file
        goes. Returns the key's file, when kept."""
        path = key_path(self.data_dir, tenant)
        if self.creds.bundle or tenant not in self.creds.api_keys:
            path.unlink(missing_ok=True)
            return None
        self.creds.api_keys[tenant] = api_key
        self.creds.save()
        write_private(path, api_key + "\n")
        return path

    async def delete(self, tenant: str) -> int:
        """Erase the tenant's data, then refuse its credentials and forget
        its keys. The erasure is the context store's (as ``DELETE
        /v1/tenants/<t>``: its histories, attachments and documents, then the
        orchestrator erases its tasks; one ``erase_tenant`` audit record);
        then the registry entry says ``deleted``, the tenant's own streams
        are deleted, its keys forgotten and it is marked deleted (a restart
        listing it skips it), the account is replaced by a tombstone in the
        resolver, BATON's import of it dropped and its files removed.
        Returns the number of sessions erased."""
        marker = _revoking(tenant)
        sessions = 0
        if marker not in self.creds.nkeys:  # else: an earlier call failed before the tombstone
            await self._known(tenant)
            account = (await self._accounts())[tenant]
            assert self.op is not None
            to, erase = subjects.context_api("delete", tenant), ContextDelete(tenant=tenant)
            reply = await self.op.request(to, erase, DeleteReply, timeout=60.0)
            if reply.error is not None:
                raise TenantError(f"the context store did not erase {tenant!r}: {reply.error}")
            sessions = int(reply.sessions or 0)
            await self._set(tenant, DELETED, "")
            await self._delete_streams(tenant)
            # Forgotten first, and marked deleted: a server or a stack (re)started
            # from now on leaves the account out of its configuration even when
            # BATON_TENANTS still lists it (``NatsServer._write_config``, ``Stack``).
            # Its account's public key is kept aside until the tombstone is
            # in: a push that fails (an election) is finished by calling
            # delete again, else the account would stay live with nothing
            # left to revoke it.
            self.creds.nkeys[marker] = account
            self.creds.forget(tenant)
            self.creds.save()
        # A tombstone, not $SYS.REQ.CLAIMS.DELETE: in a cluster a server that
        # was down during a delete still holds the account's JWT and, back,
        # its resolver sync spreads it again to the others (the deleted
        # account connects again; measured). A newer JWT admitting nobody
        # (every user revoked, no connection) wins that sync instead.
        kept = self.creds.nkeys[marker]  # a public key (a seed, by an older version)
        subject = jwt.Key(kept).public if kept.startswith("S") else kept
        revoked = {"*": int(time.time()) + 1}
        signer = self.creds.keys().operator_signer()
        tombstone = jwt.account_jwt(signer, subject, tenant, suspended=True, revocations=revoked)
        await self._push(tombstone, attempts=5)
        del self.creds.nkeys[marker]
        self.creds.save()
        await self._push_baton()
        url = self.data_dir / "tenants" / f"{tenant}.url"
        for path in (creds_path(self.data_dir, tenant), key_path(self.data_dir, tenant), url):
            path.unlink(missing_ok=True)
        return sessions
