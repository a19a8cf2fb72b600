"""Decoding rules and payload edge cases: nothing is dropped, whatever the payload."""

from __future__ import annotations

import json
import os

import orjson
import pytest
from mcloudtt_adapter.decode import DecodeRules, PayloadDecoder, TopicRule, parse_time_us
from mcloudtt_adapter.records import Batch, Record

RECEIVED = 1_767_225_600_123_456  # 2026-01-01 00:00:00.123456 UTC


def decode(payload: bytes, topic: str = "devices/d1/env", rules: DecodeRules | None = None) -> dict:
    batch = Batch()
    PayloadDecoder(rules).append(
        batch, Record(None, None, "m1", topic, payload, 1, False, RECEIVED), 42
    )
    row = batch.row(0)
    row["attributes"] = json.loads(row["attributes"]) if row["attributes"] else None
    return row


def test_flat_json_object_becomes_metrics_and_attributes() -> None:
    row = decode(b'{"temp": 21.5, "hum": 40, "status": "ok", "door": true, "note": null}')
    assert row["payload_format"] == "json"
    assert row["device_id"] == "d1"
    assert row["metrics"] == [("temp", 21.5), ("hum", 40.0)]
    assert row["attributes"] == {"status": "ok", "door": True, "note": None}
    assert row["event_time"] == RECEIVED  # no time field: the receive time
    assert row["ingest_time"] == 42


def test_nested_objects_and_lists_use_dotted_paths() -> None:
    row = decode(b'{"env": {"t": 1, "inner": {"x": 2.5}}, "vals": [3, "a", {"k": 4}], "e": {}}')
    assert row["metrics"] == [
        ("env.t", 1.0),
        ("env.inner.x", 2.5),
        ("vals.0", 3.0),
        ("vals.2.k", 4.0),
    ]
    assert row["attributes"] == {"vals.1": "a", "e": {}}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1767225600, 1_767_225_600_000_000),
        (1767225600.123456, 1_767_225_600_123_456),
        (1767225600123, 1_767_225_600_123_000),
        (1767225600123456, 1_767_225_600_123_456),
        (1767225600123456789, 1_767_225_600_123_456),
        ("2026-01-01T00:00:00.5Z", 1_767_225_600_500_000),
        ("2026-01-01T01:00:00+01:00", 1_767_225_600_000_000),
        ("2026-01-01 00:00:00", 1_767_225_600_000_000),
        ("1767225600.25", 1_767_225_600_250_000),
    ],
)
def test_time_field_formats(value: object, expected: int) -> None:
    row = decode(orjson.dumps({"ts": value, "temp": 1}))
    assert row["event_time"] == expected
    assert row["metrics"] == [("temp", 1.0)]  # the time field is not a metric


@pytest.mark.parametrize("value", [42, -1, "yesterday", True, None, 10**13 * 1000 * 1000])
def test_unusable_time_falls_back_to_receive_time_and_is_kept(value: object) -> None:
    row = decode(orjson.dumps({"ts": value}))
    assert row["event_time"] == RECEIVED
    kept = row["metrics"] or list((row["attributes"] or {}).items())
    assert kept, "the field is stored, as metric or attribute"


def test_device_from_payload_when_no_topic_rule_matches() -> None:
    row = decode(b'{"dev": "sensor-7", "temp": 3}', topic="plant/line1/temp")
    assert row["device_id"] == "sensor-7"
    assert row["metrics"] == [("temp", 3.0)]
    row = decode(b'{"temp": 3}', topic="plant/line1/temp")
    assert row["device_id"] is None  # missing fields: still stored


def test_topic_rules_capture_device_metric_and_extra_levels() -> None:
    rules = DecodeRules(topic_rules=("site/{site}/+/{device_id}/#", "devices/{device_id}/{metric}"))
    row = decode(b"21.5", topic="site/berlin/x/d9/a/b", rules=rules)
    assert row["device_id"] == "d9"
    assert row["attributes"] == {"site": "berlin"}
    assert row["metrics"] == [("b", 21.5)]  # a bare number is named by the last level
    row = decode(b"7", topic="devices/d2/battery", rules=rules)
    assert (row["device_id"], row["metrics"]) == ("d2", [("battery", 7.0)])
    with pytest.raises(ValueError):
        TopicRule("a/#/b")


def test_binary_payload_is_kept_as_bytes() -> None:
    payload = bytes(range(256)) + b"\xff\xfe\x00"
    row = decode(payload)
    assert row["payload_format"] == "binary"
    assert row["payload"] == payload
    assert row["metrics"] == [] and row["attributes"] is None


def test_malformed_json_is_text() -> None:
    for payload in (b'{"temp": 21.5', b"{bad json}", b"NaN", b'{"a": Infinity}', "héllo".encode()):
        row = decode(payload)
        assert row["payload_format"] == "text"
        assert row["payload"] == payload


def test_empty_payload() -> None:
    row = decode(b"")
    assert row["payload_format"] == "empty" and row["payload_size"] == 0


def test_one_megabyte_payloads_are_stored_whole() -> None:
    big_json = orjson.dumps({"blob": "x" * 1_048_576, "temp": 1})
    row = decode(big_json)
    assert row["payload_format"] == "json-unflattened"
    assert row["payload"] == big_json and row["payload_size"] == len(big_json)
    big_binary = os.urandom(1_048_576)
    row = decode(big_binary)
    assert row["payload_format"] == "binary" and row["payload"] == big_binary
    row = decode(b"a" * 1_048_576)
    assert row["payload_format"] == "text"


def test_long_strings_and_many_fields_are_bounded_but_kept() -> None:
    doc = {f"f{i}": i for i in range(1000)}
    doc["text"] = "y" * 5000
    row = decode(orjson.dumps(doc), rules=DecodeRules(max_fields=100))
    assert len(row["metrics"]) + len(row["attributes"] or {}) == 100
    assert orjson.loads(row["payload"]) == doc  # the payload holds everything


def test_scalar_and_array_json() -> None:
    assert decode(b'"hello"')["attributes"] == {"value": "hello"}
    assert decode(b"true")["attributes"] == {"value": True}
    assert decode(b"[1, 2]")["metrics"] == [("0", 1.0), ("1", 2.0)]


def test_ignore_fields() -> None:
    row = decode(
        b'{"seq": 5, "temp": 1, "meta": {"seq": 2}}',
        rules=DecodeRules(ignore_fields=("seq", "meta.seq")),
    )
    assert row["metrics"] == [("temp", 1.0)]


def test_parse_time_rejects_non_clock_values() -> None:
    assert parse_time_us(5) is None  # a counter, not a clock
    assert parse_time_us(float("nan")) is None
    assert parse_time_us("2026-13-01") is None


def test_simulator_payload_metadata_is_not_a_measurement() -> None:
    # The simulator's wire format: `sent` is the event time, `seq` a sequence number and `ts`
    # the device's own clock; only the fields after them are measurements.
    from mcloudtt_simulator.payloads import EVENT_TIME_FIELD, METADATA_FIELDS, encode_message

    rules = DecodeRules()
    assert rules.time_fields[0] == EVENT_TIME_FIELD
    assert set(METADATA_FIELDS) <= set(rules.metadata_fields)

    sent = RECEIVED / 1e6 - 0.25
    payload = encode_message("d1", 17, sent, sent + 3.0, {"temperature": 21.5, "co2": 640})
    row = decode(payload)
    assert row["event_time"] == round(sent * 1e6)  # `sent`, not `ts`, not the receive time
    assert row["metrics"] == [("temperature", 21.5), ("co2", 640.0)]
    assert row["attributes"]["seq"] == 17
    assert "sent" not in row["attributes"]
