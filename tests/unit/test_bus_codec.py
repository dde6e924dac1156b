"""The checks of untrusted metadata in aiwfe.bus.codec: deadlines, traceparents, job ids,
content types, schema hashes and the call preamble. What a pod answers to them is in
tests/unit/test_serving.py."""

from __future__ import annotations

import struct

import pytest

from aiwfe.bus.codec import (
    H_CONTENT_TYPE,
    H_DEADLINE,
    BadField,
    check_schema,
    is_job_id,
    is_json,
    pack_call,
    parse_deadline_ms,
    unpack_call,
    valid_traceparent,
)

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def preamble(
    version: int = 3,
    deadline_ms: int = 5000,
    schema: bytes = b"\0" * 8,
    tp: bytes = b"",
    jid: bytes = b"",
    tl: int = -1,
    jl: int = -1,
    owner: bytes = b"",
) -> bytes:
    tl = len(tp) if tl < 0 else tl
    jl = len(jid) if jl < 0 else jl
    return struct.pack("!BBI8sBBB", 0xC1, version, deadline_ms, schema, tl, jl, len(owner)) + tp + jid + owner


@pytest.mark.parametrize("text", ["inf", "-inf", "Infinity", "nan", "-1", "0", "-0", "1e400", "abc", "", " ", "1" * 40, "0x10"])
def test_bad_deadline_texts_are_refused_naming_the_header(text: str) -> None:
    with pytest.raises(BadField) as e:
        parse_deadline_ms(text)
    assert e.value.field == H_DEADLINE and H_DEADLINE in str(e.value)


@pytest.mark.parametrize(("text", "ms"), [("5000", 5000.0), ("0.5", 0.5), ("1e12", 1e12), (" 250 ", 250.0)])
def test_deadline_texts(text: str, ms: float) -> None:
    assert parse_deadline_ms(text) == ms


@pytest.mark.parametrize(
    "tp",
    [
        "",
        "garbage",
        TP.upper(),
        TP + "-extra",  # version 00 has no extra fields
        "ff" + TP[2:],  # version ff is invalid
        "00-" + "0" * 32 + TP[35:],  # all-zero trace id
        TP[:36] + "0" * 16 + "-01",  # all-zero parent id
        TP.replace("-", "_"),
        "01" + TP[2:] + "-" + "x" * 300,  # too long
        TP[:-1] + "\x00",
    ],
)
def test_invalid_traceparents_are_ignored(tp: str) -> None:
    assert valid_traceparent(tp) is None


def test_valid_traceparents_pass() -> None:
    assert valid_traceparent(TP) == TP
    assert valid_traceparent("01" + TP[2:] + "-future") == "01" + TP[2:] + "-future"


@pytest.mark.parametrize("jid", ["", "a.b", "a*", ">", "a b", "a\tb", "a\x00", "é", "a/b", "a:b", "x" * 129, "a\nb"])
def test_job_ids_that_cannot_be_subject_tokens_are_refused(jid: str) -> None:
    assert not is_job_id(jid)


def test_job_ids() -> None:
    assert all(is_job_id(j) for j in ("0f" * 16, "seq12", "A-b_9", "x" * 128))


def test_content_types_and_schema_hashes() -> None:
    assert is_json("application/json") and is_json("Application/JSON; charset=utf-8")
    assert not is_json(None) and not is_json("application/msgpack") and not is_json("application/x-msgpack")
    for bad in ("text/plain", "application/json5", "x" * 1000):
        with pytest.raises(BadField) as e:
            is_json(bad)
        assert e.value.field == H_CONTENT_TYPE and len(str(e.value)) < 200  # echoed values are cut short
    assert check_schema("0123456789abcdef") == "0123456789abcdef"
    for bad in ("", "0123456789ABCDEF", "0123456789abcde", "g" * 16, "x" * 5000):
        with pytest.raises(BadField):
            check_schema(bad)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"\xc1", "call preamble"),
        (preamble()[:10], "call preamble"),
        (preamble(version=1), "call preamble"),
        (preamble(version=2), "call preamble"),
        (preamble(jid=b"j", owner=b"a b"), "call preamble owner"),
        (preamble(jid=b"j", owner=b"\xff"), "call preamble owner"),
        (preamble(jid=b"j", owner=b"x" * 129), "call preamble owner"),
        (preamble(jid=b"j", owner=b"alice")[:-2], "call preamble"),
        (preamble(version=255), "call preamble"),
        (preamble(deadline_ms=0), "call preamble deadline"),
        (preamble(tl=200), "call preamble"),  # lengths beyond the message
        (preamble(jid=b"ab", jl=255), "call preamble"),
        (preamble(jid=b"a.b"), "call preamble job id"),
        (preamble(jid=b"*"), "call preamble job id"),
        (preamble(jid=b">"), "call preamble job id"),
        (preamble(jid=b"a b"), "call preamble job id"),
        (preamble(jid=b"\xff\xfe"), "call preamble job id"),
        (preamble(jid=b"x" * 129), "call preamble job id"),
    ],
)
def test_bad_preambles_are_refused_naming_the_field(data: bytes, field: str) -> None:
    with pytest.raises(BadField) as e:
        unpack_call(data)
    assert e.value.field == field


def test_preamble_with_garbage_traceparent_is_accepted_without_it() -> None:
    pre = unpack_call(preamble(tp=b"\xff" * 255, jid=b"job-1") + b"\x80")
    assert pre is not None and pre[2] is None and pre[3] == "job-1" and pre[4] is None and bytes(pre[5]) == b"\x80"
    pre = unpack_call(pack_call(0, b"\0" * 8, TP, b"", "j"))  # less than 1 ms left is still time left
    assert pre is not None and pre[0] == 1 and pre[2] == TP


def test_the_owner_of_the_callers_job_travels_in_the_preamble() -> None:
    """Printable ASCII owners as they are; any other owner as a stable digest (the same
    owner, the same key); with or without a job id."""
    pre = unpack_call(pack_call(500, b"\0" * 8, None, b"\x80", "job-1", "user-7f3a"))
    assert pre is not None and pre[3:5] == ("job-1", "user-7f3a") and bytes(pre[5]) == b"\x80"
    odd = ["Zoë", "a b", "x" * 200, "\x00"]
    keys = []
    for owner in odd:
        pre = unpack_call(pack_call(500, b"\0" * 8, None, b"", "job-1", owner))
        assert pre is not None and pre[4] is not None and pre[4].startswith("#") and len(pre[4]) == 33
        keys.append(pre[4])
    assert len(set(keys)) == len(odd)
    assert keys[0] == unpack_call(pack_call(500, b"\0" * 8, None, b"", "j2", "Zoë"))[4]  # type: ignore[index]
    pre = unpack_call(pack_call(500, b"\0" * 8, None, b"", None, "alice"))  # a direct call acting for a user
    assert pre is not None and pre[3] is None and pre[4] == "alice"


def test_only_inboxes_are_reply_subjects() -> None:
    from aiwfe.bus.codec import is_reply_inbox

    for ok in ("_INBOX.abc", "_INBOX.publisher.x1y2", "_INBOX.pod-gateway.tok.17"):
        assert is_reply_inbox(ok), ok
    for bad in (
        "$KV.AIWFE_RESULTS.j1",
        "$JS.API.CONSUMER.DELETE.S.c",
        "aiwfe.jobs.k",
        "_INBOX.>",
        "_INBOX.*.x",
        "_INBOX",
        "_INBOX.",
        "_INBOX..x",
        "_INBOX.a b",
        "_INBOX.a\x00",
        "_INBOX." + "x" * 300,
    ):
        assert not is_reply_inbox(bad), bad
