"""The auth plugin in real pods, against real PostgreSQL, Redis and (for the NATS runs) NATS.

The same flows run on LocalBus and on NatsBus, called from the auth pod itself (local
path) and from another pod (over the bus). Fault tests start their own embedded
PostgreSQL/Valkey and kill those, never the shared servers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from aiwfe.plugins.auth.contract import Claims, Login, Logout, Register, Verify
from tests.conftest import wait_until
from tests.support.auth import PASSWORD, SECRET, StartAuth, auth_config, counter, expect_invalid, plugin_of

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("caller", ["auth", "client"])
async def test_register_login_verify_logout(start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str, caller: str) -> None:
    async with start_auth(auth_config(pg_url, redis_url, prefix)) as pods:
        k = pods[caller].kernel
        reg = await k.call(Register(username="Alice", password=PASSWORD))
        assert reg.username == "Alice" and len(reg.user_id) == 36
        tok = await k.call(Login(username="alice", password=PASSWORD))  # usernames are case-insensitive
        assert tok.token_type == "bearer" and tok.expires_in == 3600

        claims = await k.call(Verify(token=tok.access_token))
        assert isinstance(claims, Claims)
        assert (claims.sub, claims.username, claims.exp - claims.iat) == (reg.user_id, "Alice", 3600)
        assert await k.call(Verify(token=tok.access_token)) == claims

        # the logout goes on the shared revocation list in Redis (for pods that start later)
        import redis.asyncio as aioredis

        out = await k.call(Logout(token=tok.access_token))
        assert out.jti == claims.jti
        r = aioredis.Redis.from_url(redis_url)
        assert await r.zscore(f"{prefix}:revocations", f"{claims.exp}:{claims.jti}") is not None
        await r.aclose()
        await expect_invalid(k.call(Verify(token=tok.access_token)), "InvalidToken", "revoked")
        assert (await k.call(Logout(token=tok.access_token))).jti == claims.jti  # idempotent
        # the TokenRevoked event reached the plugin's own subscription
        assert await wait_until(lambda: claims.jti in plugin_of(pods["auth"]).denylist, timeout_s=5)

        # a second login gets a fresh token that works
        tok2 = await k.call(Login(username="ALICE", password=PASSWORD))
        assert (await k.call(Verify(token=tok2.access_token))).jti != claims.jti


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    sig = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def _payload(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    p = {"sub": "u", "username": "u", "jti": "j", "iat": now, "nbf": now, "exp": now + 600, "iss": "aiwfe", "aud": "aiwfe"}
    p.update(over)
    return p


async def test_every_rejection_path(start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str) -> None:
    async with start_auth(auth_config(pg_url, redis_url, prefix)) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="bob", password=PASSWORD))
        service = plugin_of(pods["auth"]).tokens
        assert service is not None
        failures_before = counter("aiwfe_auth_failures_total", reason="expired")

        def hs(payload: dict[str, Any], kid: str = "k1", secret: str = SECRET) -> str:
            return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid})

        expired, _ = service.issue("u", "u", now=time.time() - 7200)
        cases = [
            ("", "malformed: no token"),
            ("garbage", "malformed"),
            ("a.b.c", "malformed"),
            (expired, "expired"),
            (hs(_payload(), secret="forged-" + "y" * 40), "bad signature"),
            (_forge({"alg": "none", "kid": "k1"}, _payload(), None), "algorithm not allowed"),
            (hs(_payload(aud="someone-else")), "wrong audience"),
            (hs(_payload(iss="evil")), "wrong issuer"),
            (hs(_payload(nbf=int(time.time()) + 600)), "not yet valid"),
            (hs(_payload(), kid="k404"), "unknown key"),
            (hs({k: v for k, v in _payload().items() if k != "exp"}), "malformed"),
        ]
        for token, why in cases:
            await expect_invalid(k.call(Verify(token=token)), "InvalidToken", why)
            await expect_invalid(k.call(Logout(token=token)), "InvalidToken", why)
        assert counter("aiwfe_auth_failures_total", reason="expired") == failures_before + 2

        before = counter("aiwfe_auth_failures_total", reason="invalid_credentials")
        await expect_invalid(k.call(Login(username="bob", password="wrong password")), "InvalidCredentials", "wrong")
        await expect_invalid(k.call(Login(username="nobody", password=PASSWORD)), "InvalidCredentials", "wrong")
        await expect_invalid(k.call(Login(username="bob", password="short")), "InvalidCredentials", "wrong")
        assert counter("aiwfe_auth_failures_total", reason="invalid_credentials") == before + 3

        await expect_invalid(k.call(Register(username="BOB", password=PASSWORD)), "UserExists", "user 'BOB' already exists")
        await expect_invalid(k.call(Register(username="x", password=PASSWORD)), "InvalidInput", "username")
        await expect_invalid(k.call(Register(username="has space", password=PASSWORD)), "InvalidInput", "username")
        await expect_invalid(k.call(Register(username="carol", password="short")), "InvalidInput", "password")
        await expect_invalid(k.call(Register(username="carol", password="p" * 257)), "InvalidInput", "password")


def _pem(key: Any, private: bool) -> str:
    if private:
        return str(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode()
        )
    return str(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    )


async def test_asymmetric_keys_rotation_and_key_confusion(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    old_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new_ed = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "signing.pem").write_text(_pem(new_ed, True))
    cfg = auth_config(
        pg_url,
        redis_url,
        prefix,
        jwt_algorithm="EdDSA",
        jwt_kid="2026-11",
        jwt_private_key_file=str(tmp_path / "signing.pem"),
        jwt_verify_keys=[{"kid": "2026-10", "algorithm": "RS256", "key": _pem(old_rsa, False)}],
    )
    async with start_auth(cfg) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="dave", password=PASSWORD))
        tok = await k.call(Login(username="dave", password=PASSWORD))
        assert jwt.get_unverified_header(tok.access_token) == {"alg": "EdDSA", "kid": "2026-11", "typ": "JWT"}
        assert (await k.call(Verify(token=tok.access_token))).username == "dave"

        old = jwt.encode(_payload(sub="old"), old_rsa, algorithm="RS256", headers={"kid": "2026-10"})
        assert (await k.call(Verify(token=old))).sub == "old"  # signed by the previous key: still valid

        # key confusion: HS256 "signed" with the RSA public key as the HMAC secret
        confused = _forge({"alg": "HS256", "kid": "2026-10"}, _payload(sub="admin"), _pem(old_rsa, False).encode())
        await expect_invalid(k.call(Verify(token=confused)), "InvalidToken", "algorithm not allowed")
        # an HS256 token under the signing key's id, with our test secret
        await expect_invalid(
            k.call(Verify(token=jwt.encode(_payload(), SECRET, algorithm="HS256", headers={"kid": "2026-11"}))),
            "InvalidToken",
            "algorithm not allowed",
        )
        forged = jwt.encode(_payload(), ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "2026-11"})
        await expect_invalid(k.call(Verify(token=forged)), "InvalidToken", "bad signature")
