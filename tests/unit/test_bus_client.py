"""FastClient keeps nats-py's wire format: its header encoding and parsing agree with nats-py's."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from aiwfe.bus._client import FastClient, _encode_headers


@pytest.mark.parametrize(
    "raw",
    [
        b'Aiwfe-Error: {"type":"X"}\r\nNats-Msg-Id: abc\r\n\r\n',
        b"A:1\r\nB:\t2 \r\n\r\n",
        b"Bad Name: x\r\nGood: y\r\n\r\n",
        b"Utf: caf\xc3\xa9\r\nBroken: \xff\r\n\r\n",
        b"no-colon-line\r\nK: v\r\n\r\n",
    ],
)
def test_parse_agrees_with_nats_py(raw: bytes) -> None:
    assert FastClient._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_encode_matches_wire_format() -> None:
    out = _encode_headers({"Aiwfe-Error": ' {"a": 1} ', "Nats-Msg-Id": "x\r\ny"})
    assert out == b'NATS/1.0\r\nAiwfe-Error: {"a": 1}\r\nNats-Msg-Id: x  y\r\n\r\n'
    assert FastClient._parse_header_lines(out[len(b"NATS/1.0\r\n") :]) == {"Aiwfe-Error": '{"a": 1}', "Nats-Msg-Id": "x  y"}


def test_encode_rejects_bad_keys() -> None:
    import nats.errors

    with pytest.raises(nats.errors.BadHeaderError):
        _encode_headers({"bad key": "v"})
