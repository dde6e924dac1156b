"""JWT issue/verify of the auth plugin: every rejection path, key rotation, the denylist.

Pure logic (plugins/auth/tokens.py, plugins/auth/cache.py::Denylist): no servers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from aiwfe.plugins.auth.cache import Denylist
from aiwfe.plugins.auth.contract import Claims
from aiwfe.plugins.auth.errors import InvalidToken
from aiwfe.plugins.auth.tokens import KeyRing, TokenService, token_digest

SECRET = "s" * 40
OTHER_SECRET = "o" * 40


def _pem_private(key: object) -> str:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _pem_public(key: object) -> str:
    return (
        key.public_key()  # type: ignore[attr-defined]
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keys(rsa_key: rsa.RSAPrivateKey) -> dict[str, str]:
    """PEM private keys per algorithm (and the HS256 secret)."""
    return {
        "HS256": SECRET,
        "RS256": _pem_private(rsa_key),
        "ES256": _pem_private(ec.generate_private_key(ec.SECP256R1())),
        "EdDSA": _pem_private(ed25519.Ed25519PrivateKey.generate()),
    }


def service(ring: KeyRing, **kw: object) -> TokenService:
    opts: dict[str, object] = {"issuer": "aiwfe", "audience": "aiwfe", "access_ttl_s": 600, "leeway_s": 5.0}
    opts.update(kw)
    return TokenService(ring, **opts)  # type: ignore[arg-type]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, object], payload: dict[str, object], secret: bytes | None) -> str:
    """A token built by hand (for what PyJWT refuses to produce: alg none, HMAC over a PEM)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def good_payload(**over: object) -> dict[str, object]:
    now = int(time.time())
    p: dict[str, object] = {
        "sub": "u1", "username": "alice", "jti": "j1", "iat": now, "nbf": now, "exp": now + 600,
        "iss": "aiwfe", "aud": "aiwfe", "scopes": [],
    }  # fmt: skip
    p.update(over)
    return p


def reason_of(svc: TokenService, token: str) -> tuple[str, str]:
    with pytest.raises(InvalidToken) as e:
        svc.verify(token)
    return e.value.reason, str(e.value)


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256", "EdDSA"])
def test_issue_and_verify_round_trip(keys: dict[str, str], alg: str) -> None:
    svc = service(KeyRing("k1", alg, keys[alg]))
    token, claims = svc.issue("u1", "alice", ["read"])
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": "k1", "typ": "JWT"}
    got = svc.verify(token)
    assert got == claims
    assert (got.sub, got.username, got.scopes, got.exp - got.iat) == ("u1", "alice", ["read"], 600)


def test_no_token_and_garbage_are_malformed() -> None:
    svc = service(KeyRing("k1", "HS256", SECRET))
    assert reason_of(svc, "") == ("missing", "malformed: no token")
    for junk in ("garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.%%%.xyz", "x" * 5000, "a" * 100_000):
        reason, msg = reason_of(svc, junk)
        assert reason == "malformed" and msg.startswith("malformed")


def test_expired() -> None:
    svc = service(KeyRing("k1", "HS256", SECRET))
    token, _ = svc.issue("u1", "alice", now=time.time() - 3600)
    assert reason_of(svc, token) == ("expired", "expired: the token's exp has passed")


def test_expiry_within_leeway_still_verifies() -> None:
    svc = service(KeyRing("k1", "HS256", SECRET))
    token, _ = svc.issue("u1", "alice", now=time.time() - 602)  # expired 2 s ago, leeway 5 s
    assert svc.verify(token).sub == "u1"


def test_not_yet_valid() -> None:
    svc = service(KeyRing("k1", "HS256", SECRET))
    now = int(time.time())
    token = jwt.encode(good_payload(nbf=now + 120), SECRET, algorithm="HS256", headers={"kid": "k1"})
    reason, msg = reason_of(svc, token)
    assert reason == "not_yet_valid" and msg.startswith("not yet valid")


def test_forged_signature() -> None:
    svc = service(KeyRing("k1", "HS256", SECRET))
    forged = jwt.encode(good_payload(), OTHER_SECRET, algorithm="HS256", headers={"kid": "k1"})
    assert reason_of(svc, forged) == ("bad_signature", "bad signature")
    # a real token whose payload was edited (privilege escalation attempt)
    token, _ = svc.issue("u1", "alice")
    head, _, sig = token.split(".")
    tampered = f"{head}.{b64(json.dumps(good_payload(sub='admin')).encode())}.{sig}"
    assert reason_of(svc, tampered)[0] == "bad_signature"


def test_alg_none_is_refused() -> None:
    svc = service(KeyRing("k1", "HS256", SECRET))
    for alg in ("none", "None", "NONE", None, "HS512"):
        token = hand_made({"alg": alg, "kid": "k1", "typ": "JWT"}, good_payload(), None)
        reason, msg = reason_of(svc, token)
        assert reason == "algorithm" and msg.startswith("algorithm not allowed"), (alg, msg)


def test_wrong_audience_and_issuer() -> None:
    ours = service(KeyRing("k1", "HS256", SECRET))
    other_aud = service(KeyRing("k1", "HS256", SECRET), audience="billing")
    other_iss = service(KeyRing("k1", "HS256", SECRET), issuer="evil")
    assert reason_of(ours, other_aud.issue("u1", "a")[0]) == ("audience", "wrong audience: expected 'aiwfe'")
    assert reason_of(ours, other_iss.issue("u1", "a")[0]) == ("issuer", "wrong issuer: expected 'aiwfe'")


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "jti", "sub", "nbf", "iat"])
def test_required_claims(claim: str) -> None:
    svc = service(KeyRing("k1", "HS256", SECRET))
    payload = good_payload()
    del payload[claim]
    token = jwt.encode(payload, SECRET, algorithm="HS256", headers={"kid": "k1"})
    reason, msg = reason_of(svc, token)
    assert reason == "malformed" and claim in msg


def test_unknown_or_missing_kid() -> None:
    svc = service(KeyRing("k1", "HS256", SECRET))
    token = jwt.encode(good_payload(), SECRET, algorithm="HS256", headers={"kid": "k9"})
    assert reason_of(svc, token) == ("unknown_kid", "unknown key: kid 'k9' is not one of ours")
    no_kid = jwt.encode(good_payload(), SECRET, algorithm="HS256")
    assert reason_of(svc, no_kid)[0] == "unknown_kid"


def test_key_confusion_hs256_signed_with_the_rsa_public_key(keys: dict[str, str], rsa_key: rsa.RSAPrivateKey) -> None:
    svc = service(KeyRing("rsa-1", "RS256", keys["RS256"]))
    public_pem = _pem_public(rsa_key).encode()
    token = hand_made({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}, good_payload(), public_pem)
    reason, msg = reason_of(svc, token)
    assert reason == "algorithm" and "key 'rsa-1' is RS256" in msg


def test_algorithm_must_match_the_key_of_its_kid(keys: dict[str, str]) -> None:
    # An ES256 token presented under the RSA key's id.
    svc = service(KeyRing("rsa-1", "RS256", keys["RS256"]))
    es_key = serialization.load_pem_private_key(keys["ES256"].encode(), None)
    assert isinstance(es_key, ec.EllipticCurvePrivateKey)
    es = jwt.encode(good_payload(), es_key, "ES256", {"kid": "rsa-1"})
    assert reason_of(svc, es)[0] == "algorithm"


def test_rotation_old_key_verifies_new_key_signs(keys: dict[str, str], rsa_key: rsa.RSAPrivateKey) -> None:
    old = service(KeyRing("2026-01", "RS256", keys["RS256"]))
    old_token, _ = old.issue("u1", "alice")
    rotated = service(KeyRing("2026-02", "EdDSA", keys["EdDSA"], [("2026-01", "RS256", _pem_public(rsa_key))]))
    assert rotated.verify(old_token).sub == "u1"
    new_token, _ = rotated.issue("u2", "bob")
    assert jwt.get_unverified_header(new_token)["kid"] == "2026-02"
    assert rotated.verify(new_token).sub == "u2"
    retired = service(KeyRing("2026-02", "EdDSA", keys["EdDSA"]))
    assert reason_of(retired, old_token)[0] == "unknown_kid"


def test_hs256_rotation_with_previous_secret() -> None:
    old_token, _ = service(KeyRing("h1", "HS256", OTHER_SECRET)).issue("u1", "a")
    svc = service(KeyRing("h2", "HS256", SECRET, [("h1", "HS256", OTHER_SECRET)]))
    assert svc.verify(old_token).sub == "u1"


def test_bad_key_configuration(keys: dict[str, str], rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        KeyRing("k1", "HS256", "short")
    with pytest.raises(ValueError, match="not one of"):
        KeyRing("k1", "none", SECRET)
    with pytest.raises(ValueError, match="ES256 needs"):
        KeyRing("k1", "ES256", keys["RS256"])
    with pytest.raises(ValueError, match="duplicate key id"):
        KeyRing("k1", "HS256", SECRET, [("k1", "RS256", _pem_public(rsa_key))])
    with pytest.raises(ValueError, match="kid"):
        KeyRing("", "HS256", SECRET)


def test_token_digest_is_sha256_not_hash() -> None:
    assert token_digest("abc") == hashlib.sha256(b"abc").hexdigest()


def test_denylist_holds_until_exp_and_prunes() -> None:
    d = Denylist()
    now = time.time()
    d.add("live", int(now) + 60)
    d.add("gone", int(now) - 1)  # already expired: never stored
    assert "live" in d and "gone" not in d and len(d) == 1
    for i in range(1000):
        d.add(f"j{i}", int(now) + 1, now=now)
    assert len(d) == 1001
    d.add("later", int(now) + 120, now=now + 2)  # every j* has expired by then: pruned
    assert len(d) == 2 and "live" in d and "later" in d


# -- the verifier against jwt.decode ----------------------------------------------------

_OFFSETS = [-1000, -20, 20, 1000]  # far from the 5 s leeway: no flaky boundaries
_MISSING = object()


def _reference_accepts(svc: TokenService, token: str) -> dict[str, object] | None:
    """What PyJWT's ``jwt.decode`` (the verifier before the lean one) accepts: its payload or None.

    Documented differences, applied here: padding (``=``) is refused (PyJWT accepts it for
    AWS ALB's tokens), as are ``crit`` and ``b64`` headers and NumericDates that are not
    JSON numbers (PyJWT takes ``true`` as 1). Then the claims go through ``Claims`` as they
    did after ``jwt.decode`` (an ``iat`` of ``1500.0`` is refused there).
    """
    if "=" in token:
        return None
    try:
        header = jwt.get_unverified_header(token)
        key = svc.ring.keys.get(header.get("kid"))  # type: ignore[arg-type]
        if key is None or header.get("alg") != key.algorithm or "crit" in header or "b64" in header:
            return None
        payload: dict[str, object] = jwt.decode(
            token, key.key, algorithms=[key.algorithm], audience=svc.audience, issuer=svc.issuer,
            leeway=svc.leeway_s, options={"require": ["exp", "iat", "nbf", "sub", "jti", "iss", "aud"]},
        )  # fmt: skip
        if any(isinstance(payload[c], bool) for c in ("iat", "nbf", "exp")):
            return None
        fields = {"sub": payload["sub"], "jti": payload["jti"], "exp": payload["exp"], "iat": payload["iat"]}
        msgspec.convert({**fields, "username": payload.get("username", ""), "scopes": payload.get("scopes", [])}, Claims)
        return payload
    except (jwt.PyJWTError, ValueError, TypeError, msgspec.ValidationError):
        return None


def _mutate(token: str, how: int, where: int) -> str:
    if how == 0:
        return token
    if how == 1:  # flip one character
        i = where % len(token)
        c = token[i]
        return token[:i] + ("A" if c != "A" else "B") + token[i + 1 :]
    if how == 2:  # drop the last character
        return token[:-1]
    if how == 3:  # padding on a segment
        parts = token.split(".")
        parts[where % 3] += "="
        return ".".join(parts)
    if how == 4:  # a fourth segment
        return token + ".e30"
    parts = token.split(".")  # swap two segments
    i, j = where % 3, (where + 1) % 3
    parts[i], parts[j] = parts[j], parts[i]
    return ".".join(parts)


@pytest.fixture(scope="module")
def diff_services(keys: dict[str, str]) -> dict[str, tuple[TokenService, TokenService]]:
    """Per algorithm: (verifying service with k1 and rotated k2, a service signing with k2)."""
    out = {}
    for alg in ("HS256", "RS256", "ES256", "EdDSA"):
        other = OTHER_SECRET if alg == "HS256" else keys["RS256" if alg != "RS256" else "ES256"]
        other_alg = alg if alg == "HS256" else ("RS256" if alg != "RS256" else "ES256")
        verifier = service(KeyRing("k1", alg, keys[alg], [("k2", other_alg, other)]))
        out[alg] = (verifier, service(KeyRing("k2", other_alg, other)))
    return out


def test_verify_agrees_with_jwt_decode(diff_services: dict[str, tuple[TokenService, TokenService]]) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from jwt.algorithms import get_default_algorithms

    dates = st.one_of(st.sampled_from(_OFFSETS), st.just(_MISSING), st.sampled_from(["soon", None, True, 1.5e3]))
    claims = st.fixed_dictionaries(
        {
            "iat": dates,
            "nbf": dates,
            "exp": dates,
            "iss": st.sampled_from(["aiwfe", "other", 5, None, _MISSING]),
            "aud": st.sampled_from(["aiwfe", ["x", "aiwfe"], ["x"], "other", [], "", 3, ["aiwfe", 3], _MISSING]),
            "sub": st.sampled_from(["u1", _MISSING]),
            "jti": st.sampled_from(["j1", _MISSING]),
        }
    )
    headers = st.fixed_dictionaries(
        {
            "kid": st.sampled_from(["k1", "k2", "nope", 7, _MISSING]),
            "alg": st.sampled_from(["HS256", "RS256", "ES256", "EdDSA", "none", "HS512", _MISSING]),
            "extra": st.sampled_from([_MISSING, ("crit", ["exp"]), ("b64", False), ("typ", "JWT")]),
        }
    )

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.sampled_from(["HS256", "RS256", "ES256", "EdDSA"]),
        claims,
        headers,
        st.booleans(),
        st.integers(0, 5),
        st.integers(0, 10_000),
        st.integers(0, 3),
    )
    def check(alg: str, cl: dict[str, object], hd: dict[str, object], by_other: bool, how: int, where: int, good: int) -> None:
        verifier, other = diff_services[alg]
        now = int(time.time())
        if good == 0:  # a quarter of the cases: valid claims and header, only the mutation (if any) varies
            cl = {"iat": -20, "nbf": -20, "exp": 1000, "iss": "aiwfe", "aud": ["x", "aiwfe"], "sub": "u1", "jti": "j1"}
            hd = {"kid": "k2" if by_other else "k1", "alg": (other if by_other else verifier).ring.algorithm, "extra": _MISSING}
        payload = {"username": "alice", "scopes": []}
        for name, value in cl.items():
            if value is _MISSING:
                continue
            payload[name] = now + value if isinstance(value, int) and not isinstance(value, bool) else value
        signer = other if by_other else verifier
        header = {k: v for k, v in hd.items() if k in ("kid", "alg") and v is not _MISSING}
        if isinstance(hd["extra"], tuple):
            header[hd["extra"][0]] = hd["extra"][1]
        sign_alg = signer.ring.algorithm
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
        if header.get("alg") == "none":
            signature = b""
        else:  # the signer's own algorithm, whatever the header claims
            signature = get_default_algorithms()[sign_alg].sign(signing_input.encode(), signer.ring.signing_key)
        token = f"{signing_input}.{b64(signature)}"
        token = _mutate(token, how, where)
        expected = _reference_accepts(verifier, token)
        try:
            got = verifier.verify(token)
        except InvalidToken:
            assert expected is None, (token, expected)
            return
        assert expected is not None, token
        assert (got.sub, got.jti, got.exp) == (expected["sub"], expected["jti"], expected["exp"])
        accepted.append(token)

    accepted: list[str] = []
    check()
    assert len(accepted) >= 5, "the generator must reach the accepting path too"
