"""baton/jwt.py: nkey-signed JWTs and .creds files nats-server accepts."""

from __future__ import annotations

from pathlib import Path

import nats
import nats.errors
import pytest

from baton import accounts, jwt
from baton.dev.testing import secure_nats
from baton.urls import split_creds


def test_a_token_carries_its_claims_and_its_issuers_signature() -> None:
    operator = jwt.Key(jwt.new_seed(jwt.OPERATOR))
    account = jwt.Key(jwt.new_seed(jwt.ACCOUNT))
    assert operator.public.startswith("O") and account.public.startswith("A")
    token = jwt.account_jwt(operator, account, "acme", suspended=True, revocations={"U1": 5})
    claims = jwt.decode(token)
    assert claims["iss"] == operator.public and claims["sub"] == account.public
    assert claims["name"] == "acme" and claims["nats"]["type"] == "account"
    assert claims["nats"]["limits"]["conn"] == 0 and claims["nats"]["revocations"] == {"U1": 5}
    head, _, sig = token.split(".")
    other = jwt.account_jwt(operator, account, "evil")
    with pytest.raises(ValueError, match="not a valid NATS JWT"):
        jwt.decode(f"{head}.{other.split('.')[1]}.{sig}")  # claims swapped under a signature
    with pytest.raises(ValueError):
        jwt.decode("not.a.jwt")


def test_a_creds_file_holds_the_user_jwt_and_its_seed(tmp_path: Path) -> None:
    account = jwt.Key(jwt.new_seed(jwt.ACCOUNT))
    user = jwt.Key(jwt.new_seed(jwt.USER))
    token = jwt.user_jwt(account, user, "acme", {"publish": {"allow": ["a.>"]},
                                                 "subscribe": {"allow": ["b.>"]},
                                                 "allow_responses": True})  # fmt: skip
    text = jwt.creds(token, user.seed)
    assert jwt.creds_jwt(text) == token and user.seed in text
    path = tmp_path / "acme.creds"
    path.write_text(text)
    assert jwt.creds_name(path) == "acme"
    nats_claims = jwt.decode(token)["nats"]
    assert nats_claims["pub"] == {"allow": ["a.>"]} and nats_claims["resp"]["max"] == 1


async def test_every_identity_gets_creds_the_server_accepts(tmp_path: Path) -> None:
    server = secure_nats(tmp_path, ("acme", "globex")).start()
    try:
        for identity in accounts.identities(["acme", "globex"]):
            path = server.creds_for(identity)
            assert path.stat().st_mode & 0o777 == 0o600, identity
            nc = await nats.connect(server.address, user_credentials=str(path),
                                    allow_reconnect=False, connect_timeout=10)  # fmt: skip
            await nc.close()
        assert server.creds_for("acme") == (tmp_path / "tenants" / "acme.creds").resolve()
        # Round trip through the imports (a pushed account answering 200 proves
        # nothing): acme's publish arrives in BATON under acme's name.
        op = await _connect(server.url)
        acme = await _connect(server.url_for("acme"))
        sub = await op.subscribe("baton.tasks.>")
        await op.flush()
        await acme.publish("baton.tasks.chat", b"x")
        assert (await sub.next_msg(timeout=10)).subject == "baton.tasks.acme.chat"
        feed = await acme.subscribe("baton.events.acme.>")
        await acme.flush()
        got = None
        for _ in range(40):  # the import's interest reaches BATON's side asynchronously
            await op.publish("baton.events.globex.t1", b"not yours")
            await op.publish("baton.events.acme.t1", b"yours")
            await op.flush()
            try:
                got = (await feed.next_msg(timeout=0.25)).data
                break
            except nats.errors.TimeoutError:
                continue
        assert got == b"yours"  # globex's, published first, never arrives
        # A user signed by a key the operator never signed is refused.
        rogue = jwt.Key(jwt.new_seed(jwt.ACCOUNT))
        stranger = jwt.Key(jwt.new_seed(jwt.USER))
        bad = tmp_path / "rogue.creds"
        bad.write_text(jwt.creds(jwt.user_jwt(rogue, stranger, "rogue"), stranger.seed))
        with pytest.raises((nats.errors.Error, TimeoutError, OSError)):
            await nats.connect(server.address, user_credentials=str(bad), allow_reconnect=False,
                               connect_timeout=2)  # fmt: skip
        await op.close()
        await acme.close()
    finally:
        server.stop()


async def _connect(url: str) -> nats.NATS:
    servers, creds = split_creds(url)
    return await nats.connect(servers, user_credentials=creds, allow_reconnect=False,
                              connect_timeout=10)  # fmt: skip
