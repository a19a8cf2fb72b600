"""The simulator's small MQTT client codec and the device model it is driven by."""

from __future__ import annotations

import json

import pytest
from mcloudtt_simulator import mqtt
from mcloudtt_simulator.device import CONNECT, DISCONNECT, DROP, PUBLISH, DeviceModel
from mcloudtt_simulator.fleet import Fleet
from mcloudtt_simulator.payloads import encode_message
from mcloudtt_simulator.scenario import load_scenario


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("size", [0, 1, 100, 127 - 9, 200, 16_384, 2_100_000])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_round_trip_byte_by_byte(version: int, size: int, qos: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packet = mqtt.encode_publish(
        b"a/b/c", payload, qos=qos, retain=True, pid=513 if qos else 0, version=version
    )
    reader = mqtt.PacketReader()
    got = []
    if size < 1000:
        for i in range(len(packet)):  # every strict prefix is incomplete
            got += reader.feed(packet[i : i + 1])
            assert (len(got) == 1) == (i == len(packet) - 1)
    else:
        got = reader.feed(packet[:7]) + reader.feed(packet[7:])
    ((ptype, flags, body),) = got
    assert ptype == mqtt.PUBLISH
    assert mqtt.decode_publish(flags, body, version) == (
        b"a/b/c",
        payload,
        qos,
        True,
        513 if qos else 0,
    )


def test_connect_with_will_and_subscribe_encode_as_specified() -> None:
    # MQTT 3.1.1 section 3.1: protocol name, level 4, flags (will QoS 1 retained, clean), keepalive
    packet = mqtt.encode_connect("dev-1", keepalive=60, clean=True, will=(b"s/t", b"off", 1, True))
    assert packet[0] == 0x10
    body = packet[2:]
    assert body[:7] == b"\x00\x04MQTT\x04"
    assert body[7] == 0x02 | 0x04 | 0x08 | 0x20
    assert body[8:10] == b"\x00\x3c"
    assert body[10:] == b"\x00\x05dev-1\x00\x03s/t\x00\x03off"
    v5 = mqtt.encode_connect("d", version=5)
    assert v5[2 + 6] == 5 and v5[2 + 10] == 0  # level 5, empty property block
    sub = mqtt.encode_subscribe(7, [("a/+", 1)])
    assert sub == b"\x82\x08\x00\x07\x00\x03a/+\x01"
    assert mqtt.encode_ack(mqtt.PUBREL, 258) == b"\x62\x02\x01\x02"  # PUBREL has flags 0010


def test_reader_rejects_a_malformed_length() -> None:
    with pytest.raises(mqtt.ProtocolError):
        mqtt.PacketReader().feed(b"\x30\xff\xff\xff\xff\x01")


def test_message_header_is_parseable_without_json() -> None:
    body = encode_message(
        "dev-9", 41, 1767225600.5, 1767225601.25, {"t": 21.5, "s": 'x"y'}, pad_to=120
    )
    assert len(body) == 120
    doc = json.loads(body)
    assert (doc["seq"], doc["sent"], doc["dev"], doc["ts"], doc["s"]) == (
        41,
        1767225600.5,
        "dev-9",
        1767225601.25,
        'x"y',
    )
    head = body.split(b",", 2)
    assert int(head[0][7:]) == 41 and float(head[1][7:]) == 1767225600.5


def test_device_actions_are_ordered_and_consistent() -> None:
    fleet = Fleet(load_scenario("vehicle-fleet"), 300, horizon=2 * 3600, start_tod=8 * 3600)
    for i in range(0, 300, 7):
        actions = list(DeviceModel(fleet, i).actions(fleet.horizon))
        assert actions == list(DeviceModel(fleet, i).actions(fleet.horizon))  # seeded
        times = [a[0] for a in actions]
        assert times == sorted(times)
        online = None
        seqs: dict[int, int] = {}
        for _t, kind, s, seq, _first in actions:
            if kind == CONNECT:
                assert not online
                online = True
            elif kind in (DISCONNECT, DROP):
                assert online
                online = False
            else:
                assert kind == PUBLISH and online  # publishes only while connected
                assert seq == seqs.get(s, 0)  # per-topic sequence without gaps
                seqs[s] = seq + 1
