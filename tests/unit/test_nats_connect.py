"""aiwfe.bus.nats_connect without a server: URL userinfo, redaction, which settings win, the
.creds callbacks. tests/integration/test_nats_credentials.py connects for real."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from nats.aio.client import Client

from aiwfe.bus._client import FastClient
from aiwfe.bus.nats_connect import ConnectOptionError, NatsConnectOptions, redact_url
from tests.support.nats_secure import Key, make_jwt, write_creds


def test_userinfo_moves_out_of_the_urls_percent_decoded() -> None:
    servers, kw = NatsConnectOptions().connect_args("nats://al%40ice:p%3Aw%2F@a:4222, nats://al%40ice:p%3Aw%2F@b:4222")
    assert servers == ["nats://a:4222", "nats://b:4222"]
    assert kw == {"user": "al@ice", "password": "p:w/"}
    servers, kw = NatsConnectOptions().connect_args("tok%21en@a:4222")
    assert servers == ["nats://a:4222"] and kw == {"token": "tok!en"}
    assert NatsConnectOptions().connect_args("nats://a:4222") == (["nats://a:4222"], {})


def test_explicit_credentials_replace_the_urls() -> None:
    _, kw = NatsConnectOptions(token="t").connect_args("nats://u:p@a:4222")
    assert kw == {"token": "t"}
    _, kw = NatsConnectOptions(user="x", password="y").connect_args("nats://tok@a:4222")
    assert kw == {"user": "x", "password": "y"}


def test_servers_with_different_credentials_are_refused() -> None:
    with pytest.raises(ConnectOptionError) as e:
        NatsConnectOptions().connect_args("nats://u:p@a:4222,nats://u:q@b:4222")
    assert e.value.field == "url"


def test_redaction_hides_passwords_and_tokens_only() -> None:
    assert redact_url("nats://alice:s3cr%40t@a:4222,tls://tok@b:4222,nats://c:4222") == (
        "nats://alice:***@a:4222,tls://***@b:4222,nats://c:4222"
    )
    assert redact_url("nats://bob:p@ss@a:4222") == "nats://bob:***@a:4222"  # an unencoded @ leaks nothing


def test_tls_is_wanted_for_tls_urls_and_any_tls_setting() -> None:
    assert not NatsConnectOptions().wants_tls("nats://a:4222")
    assert NatsConnectOptions().wants_tls("nats://a:4222, tls://b:4222")
    assert NatsConnectOptions(tls_hostname="nats.example").wants_tls("nats://a:4222")
    assert type(NatsConnectOptions().client("nats://a")) is FastClient
    assert type(NatsConnectOptions().client("tls://a")) is not FastClient
    # the TLS-only client overrides nats-py's private _process_info, read from 2.16
    assert list(inspect.signature(Client._process_info).parameters) == ["self", "info", "initial_connection"]


def test_creds_are_read_on_each_connect_and_a_spoiled_file_fails_instead_of_hanging(tmp_path: Path) -> None:
    account, user = Key("account"), Key("user")
    jwt = make_jwt(account, user, "u", {"type": "user"})
    creds = write_creds(tmp_path / "u.creds", jwt, user)
    opts = NatsConnectOptions(creds_file=str(creds))
    opts.check()
    _, kw = opts.connect_args("nats://a:4222")
    assert bytes(kw["user_jwt_cb"]()) == jwt.encode()
    assert len(kw["signature_cb"]("nonce")) == 88  # base64 of an ed25519 signature
    creds.write_text("rotated badly\n")  # nats-py's own reader loops forever on this
    with pytest.raises(ConnectOptionError):
        kw["user_jwt_cb"]()
