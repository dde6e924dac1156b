"""Secured nats-servers for tests: nkeys, decentralized JWTs and ``.creds`` files, a private CA.

Everything is generated in the test: nkeys with the ``nkeys`` package, JWTs in the nats-io/jwt
v2 layout (header ``{"typ": "JWT", "alg": "ed25519-nkey"}``, claims ``jti iat iss name sub``
plus a ``nats`` object with ``type`` and ``version: 2``; ``jti`` is the base32 SHA-512/256 of
the claims without it; the signature is ed25519 over ``header.payload``, base64url without
padding), certificates with ``cryptography``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys

from aiwfe.kernel.tools.embedded import EmbeddedNats, nats_server_binary

__all__ = ["ConfiguredNats", "Key", "make_ca", "make_cert", "make_jwt", "write_creds"]


class Key:
    """An nkey of one role: ``operator``, ``account`` or ``user``."""

    PREFIX = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT, "user": nkeys.PREFIX_BYTE_USER}

    def __init__(self, role: str) -> None:
        self.seed: bytes = nkeys.encode_seed(os.urandom(32), self.PREFIX[role])
        self.kp = nkeys.from_seed(bytearray(self.seed))
        self.public: str = self.kp.public_key.decode()

    def sign(self, data: bytes) -> bytes:
        return bytes(self.kp.sign(data))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(issuer: Key, subject: Key, name: str, nats: dict[str, Any]) -> str:
    """A JWT of ``nats["type"]`` (operator, account, user) about ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": issuer.public, "name": name, "sub": subject.public}
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims = {"jti": base64.b32encode(digest).rstrip(b"=").decode(), **claims, "nats": {**nats, "version": 2}}
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(issuer.sign(f'{head}.{body}'.encode()))}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def write_creds(path: Path, user_jwt: str, user: Key) -> Path:
    """A ``.creds`` file as ``nsc`` writes it (mode 0600)."""
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    path.chmod(0o600)
    return path


def _name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(dir: Path, stem: str, key: Any, cert: Any) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    cp, kp = dir / f"{stem}.pem", dir / f"{stem}-key.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    kp.chmod(0o600)
    return cp, kp


def make_ca(dir: Path, cn: str = "aiwfe test CA") -> tuple[Path, Path, Any, Any]:
    """A self-signed CA: (cert path, key path, key, cert)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (*_write(dir, "ca", key, cert), key, cert)


def make_cert(dir: Path, stem: str, ca_key: Any, ca_cert: Any, *, server: bool) -> tuple[Path, Path]:
    """A certificate signed by the CA: for ``localhost``/127.0.0.1 (server) or a client."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost" if server else stem))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(dir, stem, key, builder.sign(ca_key, hashes.SHA256()))


class ConfiguredNats(EmbeddedNats):
    """An embedded nats-server (JetStream on) that also reads the configuration ``conf``."""

    def __init__(self, data_dir: str | os.PathLike[str], conf: str, *, tls: bool = False) -> None:
        super().__init__(data_dir)
        self.conf = conf
        self.tls = tls

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port`` (to build URLs with userinfo)."""
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> ConfiguredNats:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats.conf"
        conf.write_text(self.conf)
        argv = [nats_server_binary(), "-c", str(conf), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.data_dir)]
        self._spawn(argv, timeout_s)
        return self
