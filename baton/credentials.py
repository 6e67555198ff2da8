"""A deployment's secrets: the nkeys of the NATS operator, its accounts and
users, the key that encrypts JetStream at rest and one HTTP API key per
tenant and for the operator, kept in ``<data-dir>/secrets/nats.json`` (0600),
and the ``.creds``, ``.url`` and ``.key`` files written from them (the files
and who reads them: docs/security.md, "NATS identities in compose and
Kubernetes"; ``write_deployment`` is ``baton nats-auth``)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from baton import accounts, jwt
from baton.urls import with_creds

SECRETS_FILE = Path("secrets") / "nats.json"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (0600, in a 0700
    directory when it creates one), replacing it in one step: for files that
    hold secrets. A file it replaces keeps its group-read bit (never more):
    compose's containers read theirs through a group (``stack.sh``), and the
    tenant-admin bundle the orchestrator rewrites stays readable to the
    operator's ``baton nats-auth``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        mode = path.stat().st_mode & 0o640 | 0o600 if path.exists() else 0o600
    except OSError:
        mode = 0o600
    # Whole or not at all: a client re-reading its .creds while it is
    # rewritten (a service reconnecting) must never see half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if mode != 0o600:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def create_private(path: Path, text: str) -> None:
    """Create ``path`` holding ``text`` (0600 from its first byte) unless it
    exists already: whole, never half-written, and processes that start
    together agree on the one that was created first."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        with contextlib.suppress(FileExistsError):  # another process was first
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def new_secret(nbytes: int = 24) -> str:
    """A random secret that is safe in a URL and as a ``$VARIABLE`` value:
    nats-server parses a variable's value as a config token, so one that
    starts with a digit (``1e5...``) is read as a number and refused."""
    return "s" + secrets.token_hex(nbytes)


_SAVED = ("cipher_key", "api_keys", "nkeys", "deleted", "regions", "bundle")
"""The fields of ``Credentials`` its secrets file keeps."""


@dataclass
class Credentials:
    """The nkeys of the operator, accounts and users, the JetStream
    encryption key and HTTP API keys per tenant and for the operator."""

    cipher_key: str = ""
    api_keys: dict[str, str] = field(default_factory=dict)
    # nkey seeds: "operator", "account:<name>", "user:<identity>"
    nkeys: dict[str, str] = field(default_factory=dict)
    # Tenants `baton tenant delete` deleted: never given keys again by a
    # (re)start that still lists them (BATON_TENANTS), only by `tenant create`.
    deleted: list[str] = field(default_factory=list)
    # Every region a tenant was given (`baton tenant create --region`,
    # `baton tenant region`): the context store's .creds name each one's
    # streams. Never shrinks: a region's streams may outlive its tenants.
    regions: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    # A tenant-admin bundle (``write_admin_bundle``): no identity key of the
    # operator, BATON or SYS, only their signing keys and public keys.
    bundle: bool = False

    @classmethod
    def load_or_create(cls, data_dir: Path, tenants: Sequence[str]) -> Credentials:
        """Read the secrets file, adding an nkey for every account and user
        and an API key for every tenant it lacks (existing ones are kept, so
        clients' ``.creds`` stay valid). A deleted tenant among ``tenants`` is
        left out (``live``)."""
        path = Path(data_dir) / SECRETS_FILE
        creds = cls()
        if path.exists():
            doc = json.loads(path.read_text())
            creds = cls(**{f: doc[f] for f in _SAVED if f in doc})
        creds.data_dir = Path(data_dir)
        tenants = creds.live(tenants)
        changed = creds.add_nkeys(tenants)
        if creds.bundle:  # the operator's HTTP key and the cipher key are not its business
            for tenant in tenants:
                if tenant not in creds.api_keys:
                    creds.api_keys[tenant] = f"bk-{new_secret()}"
                    changed = True
            if changed:
                creds.save()
            return creds
        for holder in [*tenants, accounts.OPERATOR]:
            if holder not in creds.api_keys:
                creds.api_keys[holder] = f"bk-{new_secret()}"
                changed = True
        if not creds.cipher_key:
            creds.cipher_key = new_secret(32)
            changed = True
        if changed or not path.exists():
            creds.save()
        return creds

    def save(self) -> None:
        """Rewrite the secrets file (0600)."""
        assert self.data_dir is not None
        body = {f: getattr(self, f) for f in ("cipher_key", "api_keys", "nkeys")}
        body |= {"deleted": sorted(set(self.deleted)), "regions": sorted(set(self.regions))}
        if self.bundle:
            body = {"bundle": True, **body}
            del body["cipher_key"]
        write_private(self.data_dir / SECRETS_FILE, json.dumps(body, indent=2))

    def live(self, tenants: Sequence[str]) -> list[str]:
        """``tenants`` without the deleted ones."""
        return [t for t in tenants if t not in self.deleted]

    def forget(self, tenant: str) -> None:
        """Drop the tenant's keys and mark it deleted (call ``save``)."""
        for k in (f"account:{tenant}", f"user:{tenant}", f"revocations:{tenant}"):
            self.nkeys.pop(k, None)
        self.api_keys.pop(tenant, None)
        if tenant not in self.deleted:
            self.deleted.append(tenant)

    def add_nkeys(self, tenants: Sequence[str]) -> bool:
        """Add an nkey for every account and user of ``tenants`` that has
        none; True when one was added. A bundle gets only tenants' keys."""
        wanted: dict[str, str] = {}
        if not self.bundle:
            wanted = {
                "operator": jwt.OPERATOR,
                f"signing:{accounts.OPERATOR_SIGNER}": jwt.OPERATOR,
                f"signing:{accounts.BATON_ACCOUNT}": jwt.ACCOUNT,
            }
            for name in (accounts.BATON_ACCOUNT, accounts.SYSTEM_ACCOUNT):
                wanted[f"account:{name}"] = jwt.ACCOUNT
            for identity in accounts.identities([]):
                wanted[f"user:{identity}"] = jwt.USER
        for tenant in tenants:
            wanted[f"account:{tenant}"] = jwt.ACCOUNT
            wanted[f"user:{tenant}"] = jwt.USER
        missing = {k: kind for k, kind in wanted.items() if k not in self.nkeys}
        for k, kind in missing.items():
            self.nkeys[k] = jwt.new_seed(kind)
        return bool(missing)

    def tenants(self) -> list[str]:
        """Every tenant with an account key (created at start or at run time)."""
        skip = {f"account:{accounts.BATON_ACCOUNT}", f"account:{accounts.SYSTEM_ACCOUNT}"}
        return sorted(
            k.split(":", 1)[1] for k in self.nkeys if k.startswith("account:") and k not in skip
        )

    def revocations(self, account: str) -> dict[str, int]:
        """User public key -> revoked-at (unix s) of ``account``'s JWT."""
        out: dict[str, int] = json.loads(self.nkeys.get(f"revocations:{account}", "{}"))
        return out

    def keys(self) -> accounts.Keys:
        """The deployment's nkeys (operator, accounts, users)."""

        def under(p: str) -> dict[str, str]:
            return {k.removeprefix(p): v for k, v in self.nkeys.items() if k.startswith(p)}

        def pick(p: str) -> dict[str, jwt.Key]:
            return {name: jwt.Key(seed) for name, seed in under(p).items()}

        operator = self.nkeys.get("operator")
        ident = jwt.Key(operator) if operator else None
        accts, users, signing = pick("account:"), pick("user:"), pick("signing:")
        return accounts.Keys(ident, accts, users, signing, under("public:account:"))

    def write_admin_bundle(self, dest: Path, tenants: Sequence[str]) -> dict[str, Path]:
        """The tenant-admin bundle at ``dest``: what the tenant lifecycle
        (``baton.tenants.TenantAdmin``, the orchestrator's ``/v1/tenants``)
        needs and no more — the operator's signing key (it signs accounts),
        BATON's signing key (it signs BATON's users, the orchestrator's
        re-issued JWT among them), the public keys of the operator's accounts,
        the system user's ``.creds`` (it pushes accounts to the resolver), the
        orchestrator's ``.creds`` and the tenants' keys. Never the operator's
        identity key, nor BATON's or SYS's. Each file 0600. Tenants the bundle
        made at run time are adopted first (``adopt``). Returns what -> file."""
        keys = self.keys()
        assert keys.operator is not None, "a bundle is written from the full keys"
        nkeys = {
            f"signing:{h}": self.nkeys[f"signing:{h}"]
            for h in (accounts.OPERATOR_SIGNER, accounts.BATON_ACCOUNT)
        }
        for name in (accounts.BATON_ACCOUNT, accounts.SYSTEM_ACCOUNT):
            nkeys[f"public:account:{name}"] = keys.account(name)
        for user in (accounts.SYSTEM_USER, accounts.ORCHESTRATOR):
            nkeys[f"user:{user}"] = self.nkeys[f"user:{user}"]
        for t in tenants:
            for k in (f"account:{t}", f"user:{t}", f"revocations:{t}"):
                if k in self.nkeys:
                    nkeys[k] = self.nkeys[k]
        bundle = Credentials(api_keys={t: self.api_keys[t] for t in tenants if t in self.api_keys},
                             nkeys=nkeys, deleted=list(self.deleted), data_dir=Path(dest),
                             regions=list(self.regions), bundle=True)  # fmt: skip
        bundle.save()
        out = {"nats.json": Path(dest) / SECRETS_FILE}
        for user in (accounts.SYSTEM_USER, accounts.ORCHESTRATOR):
            path = creds_path(Path(dest), user)
            write_private(path, accounts.user_creds(keys, user, tenants))
            out[f"{user}.creds"] = path
        return out

    def adopt(self, bundle_dir: Path) -> bool:
        """Take in what the tenant-admin bundle at ``bundle_dir`` changed at
        run time (tenants created, rotated or deleted through it), so a new
        ``auth.conf`` and bundle keep them; True when something changed."""
        path = Path(bundle_dir) / SECRETS_FILE
        if not path.exists():
            return False
        doc = json.loads(path.read_text())
        if not doc.get("bundle"):
            return False
        changed = False
        for tenant in doc.get("deleted", []):
            if tenant not in self.deleted:
                self.forget(tenant)
                changed = True
        own = {accounts.BATON_ACCOUNT, accounts.SYSTEM_ACCOUNT, accounts.SYSTEM_USER,
               accounts.OPERATOR, *accounts.SERVICES}  # fmt: skip
        for k, v in dict(doc.get("nkeys", {})).items():
            kind, _, holder = k.partition(":")
            if kind not in ("account", "user", "revocations") or holder in own:
                continue
            if holder not in self.deleted and self.nkeys.get(k) != v:
                self.nkeys[k] = v
                changed = True
        for tenant, key in dict(doc.get("api_keys", {})).items():
            if tenant not in self.deleted and self.api_keys.get(tenant) != key:
                self.api_keys[tenant] = key
                changed = True
        for region in doc.get("regions", []):  # a region first given through the bundle
            if region not in self.regions:
                self.regions.append(region)
                changed = True
        if changed:
            self.save()
        return changed

    def creds_path(self, identity: str) -> Path:
        """Where ``identity``'s ``.creds`` file is written."""
        assert self.data_dir is not None
        return creds_path(self.data_dir, identity)

    def write_creds(self, tenants: Sequence[str]) -> dict[str, Path]:
        """Write every identity's ``.creds`` (0600); returns identity -> file."""
        keys = self.keys()
        out = {}
        for identity in accounts.identities(tenants):
            path = self.creds_path(identity)
            write_private(path, accounts.user_creds(keys, identity, tenants, self.regions))
            out[identity] = path
        return out

    def api_key_scopes(self, tenants: Sequence[str]) -> dict[str, str]:
        """``BATON_API_KEYS`` for these tenants: key -> tenant, the operator's -> ``*``."""
        scopes = {self.api_keys[t]: t for t in tenants}
        scopes[self.api_keys[accounts.OPERATOR]] = OPERATOR_SCOPE
        return scopes

    def write_api_keys(self, data_dir: Path, tenants: Sequence[str]) -> None:
        """Write each tenant's API key to ``tenants/<tenant>.key`` and the
        operator's to ``operator.key`` (0600)."""
        for tenant in tenants:
            write_private(key_path(data_dir, tenant), self.api_keys[tenant] + "\n")
        write_private(key_path(data_dir, None), self.api_keys[accounts.OPERATOR] + "\n")

    def creds_url(self, identity: str, host: str, port: int, scheme: str = "nats") -> str:
        """Baton's own form for a server in operator mode: the address and
        ``identity``'s ``.creds`` file (``baton.urls.split_creds``)."""
        return with_creds(f"{scheme}://{host}:{port}", self.creds_path(identity))

    def write_urls(
        self, data_dir: Path, tenants: Sequence[str], host: str, port: int, scheme: str = "nats"
    ) -> dict[str, Path]:
        """Write each tenant's URL and the operator's: the server's address,
        which a client passes to ``connect()`` with the ``.creds`` file beside
        it (no password: in operator mode every user is a JWT); returns
        identity -> file."""
        out: dict[str, Path] = {}
        address = f"{scheme}://{host}:{port}\n"
        for tenant in tenants:
            path = Path(data_dir) / "tenants" / f"{tenant}.url"
            write_private(path, address)
            out[tenant] = path
        path = Path(data_dir) / "operator.url"
        write_private(path, address)
        out[accounts.OPERATOR] = path
        return out


AUTH_CONF = Path("nats") / "auth.conf"
ADMIN_BUNDLE = Path("tenant-admin")
"""Where ``baton nats-auth`` writes the tenant-admin bundle under its directory."""
AUTH_HEADER = """\
# GENERATED by `baton nats-auth` (baton/accounts.py, operator_auth): the
# operator, its accounts as JWTs and the full resolver. Signed public data,
# no secret; every client presents its user JWT (.creds). Regenerate it
# after a tenant is added to the deployment's list.
"""


def write_deployment(
    data_dir: Path,
    tenants: Sequence[str],
    *,
    resolver_dir: str,
    host: str = "127.0.0.1",
    port: int = 4222,
    regions: Sequence[str] = (),
) -> dict[str, Path]:
    """What compose and Kubernetes run NATS in operator mode with, written
    under ``data_dir`` the way ``baton up`` writes its own: the keys
    (created once, then kept), the server's ``nats/auth.conf`` (its resolver
    keeps accounts in ``resolver_dir``, a path on the server), every
    identity's ``.creds`` and the tenants' and operator's URLs (``host``,
    ``port``: the server as clients outside reach it). Returns what -> file.
    A deleted tenant (``baton tenant delete``) is left out. ``regions``:
    regions declared ahead (``BATON_REGIONS``): the context store's
    ``.creds`` names their streams from the start, so a tenant created at
    run time in one of them needs nothing rendered again (recorded; the
    list never shrinks)."""
    data_dir = Path(data_dir)
    creds = Credentials.load_or_create(data_dir, tenants)
    creds.adopt(data_dir / ADMIN_BUNDLE)  # tenants created or deleted through /v1/tenants
    if new := [r for r in regions if r not in creds.regions]:
        creds.regions.extend(new)
        creds.save()
    # Every tenant with keys: one made at run time stays in BATON's imports.
    tenants = creds.live(list(dict.fromkeys([*tenants, *creds.tenants()])))
    out = {f"{identity}.creds": path for identity, path in creds.write_creds(tenants).items()}
    revocations = {t: creds.revocations(t) for t in tenants}
    conf = accounts.operator_auth(
        tenants, creds.keys(), resolver_dir=resolver_dir, revocations=revocations
    )
    write_private(data_dir / AUTH_CONF, AUTH_HEADER + accounts.to_conf_entries(conf))
    out["auth.conf"] = data_dir / AUTH_CONF
    urls = creds.write_urls(data_dir, tenants, host, port)
    out |= {f"{identity}.url": path for identity, path in urls.items()}
    bundle = creds.write_admin_bundle(data_dir / ADMIN_BUNDLE, tenants)
    out |= {f"{ADMIN_BUNDLE}/{what}": path for what, path in bundle.items()}
    return out


OPERATOR_SCOPE = "*"
"""The scope of an operator's API key: every tenant."""


def creds_path(data_dir: Path, identity: str) -> Path:
    """Where ``identity``'s ``.creds`` file lives: ``tenants/<t>.creds``,
    ``operator.creds``, ``secrets/creds/<service>.creds``."""
    base = Path(data_dir).resolve()
    if identity == accounts.OPERATOR:
        return base / "operator.creds"
    if identity in (*accounts.SERVICES, accounts.SYSTEM_USER):
        return base / "secrets" / "creds" / f"{identity}.creds"
    return base / "tenants" / f"{identity}.creds"


def key_path(data_dir: Path, tenant: str | None) -> Path:
    """Where ``baton up`` writes the tenant's API key (the operator's for None)."""
    base = Path(data_dir)
    return base / "operator.key" if tenant is None else base / "tenants" / f"{tenant}.key"


def read_api_key(data_dir: Path, tenant: str | None = None) -> str:
    """An API key ``baton up`` wrote: the tenant's, or the operator's for None.

    Raises:
        FileNotFoundError: no such file (the stack was not started with that tenant).
    """
    return key_path(data_dir, tenant).read_text().strip()


def read_url(data_dir: Path, tenant: str | None = None) -> str:
    """A URL ``baton up`` wrote: the tenant's, or the operator's for None,
    with its ``.creds`` file in Baton's form (``baton.urls.split_creds``).

    Raises:
        FileNotFoundError: no such file (the stack was not started with that tenant).
    """
    base = Path(data_dir)
    path = base / "operator.url" if tenant is None else base / "tenants" / f"{tenant}.url"
    url = path.read_text().strip()
    creds = creds_path(base, accounts.OPERATOR if tenant is None else tenant)
    return with_creds(url, creds) if creds.exists() and "?" not in url else url
