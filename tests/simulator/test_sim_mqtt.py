"""The simulator's message format and the device model it is driven by (its MQTT packets come
from the client codec, tested in tests/mqttclient)."""

from __future__ import annotations

import json

from mcloudtt_simulator.device import CONNECT, DISCONNECT, DROP, PUBLISH, DeviceModel
from mcloudtt_simulator.fleet import Fleet
from mcloudtt_simulator.payloads import encode_message
from mcloudtt_simulator.scenario import load_scenario


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
