"""Cluster envelope and inbox records: the fast builders and readers agree with the format."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcloudtt_broker.cluster.envelope import (
    Envelope,
    EnvelopeError,
    EnvelopePacker,
    EnvelopeReader,
    decode_envelope,
    encode_envelope,
    unpack_envelope,
)
from mcloudtt_broker.cluster.records import InboxError, encode_record, iter_records
from mcloudtt_broker.mqtt.properties import EMPTY_PROPERTIES, Properties

RICH = Properties(
    payload_format_indicator=1,
    message_expiry_interval=30,
    content_type="application/json",
    response_topic="replies/1",
    correlation_data=b"\x00\x01",
    user_properties=(("site", "lyon"), ("ünï", "cödé")),
)

topic_names = st.text(
    alphabet=st.characters(blacklist_characters="+#\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
)
client_ids = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


def wire(topic: str) -> bytes:
    raw = topic.encode()
    return len(raw).to_bytes(2, "big") + raw


@settings(max_examples=300)
@given(
    topic=topic_names,
    client_id=client_ids,
    payload=st.binary(max_size=300),
    qos=st.integers(0, 2),
    sequence=st.integers(0, 2**63),
    rich=st.booleans(),
)
def test_plain_record_is_the_plain_record_of_the_envelope(
    topic: str, client_id: str, payload: bytes, qos: int, sequence: int, rich: bool
) -> None:
    packer = EnvelopePacker("broker-ä".encode())
    props = RICH if rich else EMPTY_PROPERTIES
    envelope = packer.envelope(
        sequence, 1_700_000_000_000_000, client_id, wire(topic), payload, qos, False, props
    )
    record = packer.plain_record(
        sequence, 1_700_000_000_000_000, client_id, wire(topic), payload, qos, props
    )
    assert record == encode_record(envelope, True, ())
    assert unpack_envelope(envelope) == (
        "broker-ä",
        sequence,
        1_700_000_000_000_000,
        client_id,
        topic,
        payload,
        qos,
        False,
        props,
    )


def test_envelope_round_trip_through_the_dataclass() -> None:
    original = Envelope(
        origin="a",
        sequence=7,
        received_at_us=123,
        client_id="dev-1",
        topic="site/1/temp",
        payload=b"21.5",
        qos=2,
        retain=True,
        properties=RICH,
    )
    assert decode_envelope(encode_envelope(original)) == original


def test_a_batch_mixing_plain_and_shared_records_reads_back_in_order() -> None:
    packer = EnvelopePacker(b"a")
    envelopes = [
        packer.envelope(
            n, 0, f"c{n}", wire(f"t/{n}"), bytes([n]) * n, n % 3, False, EMPTY_PROPERTIES
        )
        for n in range(1, 7)
    ]
    records = [
        encode_record(envelopes[0], True, ()),
        encode_record(envelopes[1], False, ("$share/g/t/#",)),
        packer.plain_record(3, 0, "c3", wire("t/3"), b"\x03" * 3, 0, EMPTY_PROPERTIES),
        encode_record(envelopes[3], True, ("$share/g/t/#", "$share/h/+/4")),
        encode_record(envelopes[4], False, ()),
        encode_record(envelopes[5], True, ()),
    ]
    batch = b"".join(records)
    seen = []
    for plain, groups, start, stop in iter_records(batch):
        fields = EnvelopeReader().read(batch, start, stop)
        seen.append((plain, groups, fields[1], fields[4], fields[5]))
    assert seen == [
        (True, (), 1, "t/1", b"\x01"),
        (False, ("$share/g/t/#",), 2, "t/2", b"\x02" * 2),
        (True, (), 3, "t/3", b"\x03" * 3),
        (True, ("$share/g/t/#", "$share/h/+/4"), 4, "t/4", b"\x04" * 4),
        (False, (), 5, "t/5", b"\x05" * 5),
        (True, (), 6, "t/6", b"\x06" * 6),
    ]


def test_every_cut_inside_the_fields_is_an_envelope_error() -> None:
    envelope = EnvelopePacker(b"a").envelope(1, 2, "client", wire("a/b"), b"", 1, False, RICH)
    for cut in range(len(envelope)):  # the payload is empty: every strict prefix lacks a field
        with pytest.raises(EnvelopeError):
            unpack_envelope(envelope[:cut])
    # A record whose envelope ends early inside a batch is caught the same way.
    batch = encode_record(envelope[:-3], True, ()) + encode_record(envelope, True, ())
    (_, _, start, stop), second = iter_records(batch)
    with pytest.raises(EnvelopeError):
        EnvelopeReader().read(batch, start, stop)
    assert EnvelopeReader().read(batch, second[2], second[3])[4] == "a/b"


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda e: b"\x02" + e[1:], "unknown envelope version"),
        (lambda e: e[:1] + b"\x03" + e[2:], "invalid envelope flags"),
        (lambda e: e[:1] + b"\x08" + e[2:], "invalid envelope flags"),
        (lambda e: e.replace(b"a/b", b"a/+"), "invalid topic"),
        (lambda e: e.replace(b"a/b", b"a\xffb"), "malformed envelope"),
    ],
)
def test_bad_envelopes_say_what_is_wrong(mutate, why: str) -> None:
    envelope = EnvelopePacker(b"x").envelope(
        1, 2, "c", wire("a/b"), b"p", 0, False, EMPTY_PROPERTIES
    )
    with pytest.raises(EnvelopeError, match=why):
        unpack_envelope(mutate(envelope))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_an_envelope_or_an_envelope_error(data: bytes) -> None:
    try:
        fields = unpack_envelope(data)
    except EnvelopeError:
        return
    topic, qos = fields[4], fields[6]
    assert topic and not {"+", "#", "\x00"} & set(topic)
    assert qos in (0, 1, 2)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_batches_are_records_or_an_inbox_error(data: bytes) -> None:
    try:
        for _, _, start, stop in iter_records(data):
            assert 0 <= start <= stop <= len(data)
    except InboxError:
        pass


def test_records_of_one_publisher_and_topic_reuse_the_cached_parts_correctly() -> None:
    packer = EnvelopePacker(b"a")
    for n, (payload, props) in enumerate(
        [(b"1", EMPTY_PROPERTIES), (b"22", RICH), (b"", EMPTY_PROPERTIES), (b"4444", RICH)]
    ):
        record = packer.plain_record(n, n * 10, "pub", wire("s/t"), payload, n % 3, props)
        envelope = packer.envelope(n, n * 10, "pub", wire("s/t"), payload, n % 3, False, props)
        assert record == encode_record(envelope, True, ())
        assert unpack_envelope(record[6:]) == (
            "a",
            n,
            n * 10,
            "pub",
            "s/t",
            payload,
            n % 3,
            False,
            props,
        )


def test_the_caches_stay_bounded() -> None:
    packer = EnvelopePacker(b"a")
    reader = EnvelopeReader()
    for n in range(25_000):
        record = packer.plain_record(n, 0, f"device-{n}", wire("t"), b"", 0, EMPTY_PROPERTIES)
        reader.read(record, 6, len(record))
    assert len(packer._clients) <= 10_000
    assert len(packer._middles) <= 10_000
    assert len(reader._names) <= 10_000
    record = packer.plain_record(1, 0, "device-3", wire("t"), b"", 0, EMPTY_PROPERTIES)
    assert unpack_envelope(record[6:])[3] == "device-3"


def test_a_broker_id_over_255_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="255"):
        EnvelopePacker(b"x" * 256)
