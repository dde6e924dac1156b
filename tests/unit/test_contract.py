from __future__ import annotations

import msgspec
import pytest

from aiwfe.kernel.contract import Event, Job, Reply, Request, address_of, kind_of, reply_type, schema_hash


class Out(Reply):
    x: int


class Good(Request[Out], tag="demo.good"):
    a: str


class GoodJob(Job[Out], tag="demo.job"):
    n: int = 0


class Happened(Event, tag="demo.happened"):
    what: str = ""


class NoTag(Request[Out]):
    a: str = ""


class BadTag(Request[Out], tag="Demo-Bad"):
    a: str = ""


def test_address_and_kind() -> None:
    assert address_of(Good) == "demo.good"
    assert kind_of(Good) == "request"
    assert kind_of(GoodJob) == "job"
    assert kind_of(Happened) == "event"


def test_reply_types() -> None:
    assert reply_type(Good) is Out
    assert reply_type(GoodJob) is Out
    assert reply_type(Happened) is None


@pytest.mark.parametrize("cls", [NoTag, BadTag])
def test_address_must_be_dotted_lowercase(cls: type) -> None:
    with pytest.raises(TypeError, match="give it an address"):
        address_of(cls)


def test_not_a_contract() -> None:
    with pytest.raises(TypeError, match="not a contract"):
        address_of(Out)


def test_contracts_are_frozen() -> None:
    g = Good(a="x")
    with pytest.raises(AttributeError):
        g.a = "y"  # type: ignore[misc]


def test_schema_hash_is_stable_and_tracks_fields() -> None:
    class Good2(Request[Out], tag="demo.good"):
        a: str
        b: int = 0

    assert schema_hash(Good) == schema_hash(Good)
    assert len(schema_hash(Good)) == 16
    assert schema_hash(Good) != schema_hash(Good2)


def test_tag_travels_in_the_payload() -> None:
    raw = msgspec.json.encode(Good(a="x"))
    assert raw == b'{"type":"demo.good","a":"x"}'
    assert msgspec.json.decode(b'{"a":"y"}', type=Good) == Good(a="y")
