"""What the container tests use from the host: a blocking paho-mqtt client on a container's
address, and the broker's HTTP endpoints as the kubelet and Prometheus call them."""

from __future__ import annotations

import queue
import threading
import urllib.error
import urllib.request
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

TIMEOUT = 10.0


def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET as a Kubernetes httpGet probe does it: status and body; a status in 200-399 passes."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(host: str, name: str, port: int = 8080) -> float:
    status, text = http_get(host, port, "/metrics")
    assert status == 200, status
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name} on {host}")


class Client:
    """A connected MQTT 5 paho client; received messages land in `messages`."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason: Any = None
        self._subacks: queue.Queue[Any] = queue.Queue()
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.on_subscribe = lambda c, u, mid, codes, p: self._subacks.put(codes)
        self.c.connect(host, port, keepalive=30)
        self.c.loop_start()
        assert self.connected.wait(TIMEOUT), f"no CONNACK from {host}:{port}"

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
        self.disconnect_reason = rc
        self.disconnected.set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.c.subscribe(topic, qos)
        codes = self._subacks.get(timeout=TIMEOUT)
        assert [int(code.value) for code in codes] == [qos], codes

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.c.publish(topic, payload, qos)
        info.wait_for_publish(TIMEOUT)  # PUBACK received: the broker has it
        assert info.is_published()

    def get(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
