"""A blocking wrapper around paho-mqtt 2.x for tests: every call waits for its ack, with a deadline."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from brokerproc import TARGET
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 5.0

mcloudtt_only = pytest.mark.skipif(TARGET == "mosquitto", reason="mcloudtt-specific contract")

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = TIMEOUT, what: str = "condition") -> T:
    """Poll `predicate` until it returns something true (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def props(packet_type: int = PacketTypes.PUBLISH, **values: Any) -> Properties:
    """paho Properties from keyword names, e.g. props(MessageExpiryInterval=5)."""
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


class PahoClient:
    """A connected paho client whose received messages land in `messages`."""

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        version: int = 5,
        clean: bool = True,
        keepalive: int = 60,
        session_expiry: int | None = None,
        connect_props: dict[str, Any] | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        will_props: Properties | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.version = version
        proto = {5: mqtt.MQTTv5, 3: mqtt.MQTTv31}.get(version, mqtt.MQTTv311)
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=proto,
            clean_session=clean if version != 5 else None,
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: tuple[Any, Any, Any] | None = None
        self.disconnect_reason: Any = None
        self._acks: dict[int, Any] = {}
        self._ack_cv = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_ack
        self.c.on_unsubscribe = self._on_ack
        if username is not None:
            self.c.username_pw_set(username, password)
        if will is not None:
            self.c.will_set(*will, properties=will_props)
        cprops = None
        if version == 5:
            cprops = Properties(PacketTypes.CONNECT)
            if session_expiry is not None:
                cprops.SessionExpiryInterval = session_expiry
            for k, v in (connect_props or {}).items():
                setattr(cprops, k, v)
        self.c.connect(
            "127.0.0.1",
            port,
            keepalive,
            clean_start=clean if version == 5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=cprops,
        )
        self.c.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"

    # callbacks run on paho's thread: keep them trivial
    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
        self.connack = (flags, rc, p)
        self.connected.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
        self.disconnect_reason = rc
        self.disconnected.set()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg)

    def _on_ack(self, c: Any, u: Any, mid: int, codes: Any, p: Any) -> None:
        with self._ack_cv:
            self._acks[mid] = codes
            self._ack_cv.notify_all()

    def _wait_ack(self, mid: int) -> Any:
        with self._ack_cv:
            assert self._ack_cv.wait_for(lambda: mid in self._acks, TIMEOUT), "no SUBACK/UNSUBACK"
            return self._acks.pop(mid)

    @property
    def session_present(self) -> bool:
        assert self.connack is not None
        return bool(self.connack[0].session_present)

    @property
    def reason(self) -> int:
        assert self.connack is not None
        return int(self.connack[1].value)

    def subscribe(self, topic: str, qos: int = 0, **opts: Any) -> list[int]:
        """Subscribe; returns the granted QoS / reason code values from the SUBACK."""
        if self.version == 5:
            sub_props = opts.pop("props", None)
            rc, mid = self.c.subscribe(
                topic, options=SubscribeOptions(qos=qos, **opts), properties=sub_props
            )
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return [int(getattr(code, "value", code)) for code in self._wait_ack(mid)]

    def unsubscribe(self, topic: str) -> Any:
        rc, mid = self.c.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return self._wait_ack(mid)

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        wait: bool = True,
    ) -> mqtt.MQTTMessageInfo:
        info = self.c.publish(topic, payload, qos, retain, properties=properties)
        if wait:
            info.wait_for_publish(TIMEOUT)
            assert info.is_published(), "publish not acknowledged in time"
        return info

    def get(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no message in time") from None

    def nothing_more(self, timeout: float, what: str) -> None:
        """Assert that no further message arrives within `timeout` (`what` names the fault)."""
        try:
            extra = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"{what}: {extra.topic} {extra.payload!r}")

    def get_n(self, n: int, timeout: float = TIMEOUT) -> list[mqtt.MQTTMessage]:
        return [self.get(timeout) for _ in range(n)]

    def until(self, topic: str, timeout: float = TIMEOUT) -> list[mqtt.MQTTMessage]:
        """Messages received before the first one on `topic` (a marker), marker excluded."""
        got = []
        while True:
            m = self.get(timeout)
            if m.topic == topic:
                return got
            got.append(m)

    def disconnect(self) -> None:
        if self.c.is_connected():
            self.c.disconnect()
            self.disconnected.wait(TIMEOUT)
        self.c.loop_stop()

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT (as a crashed device would)."""
        self.killed = True
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.close()

    def stop(self) -> None:
        """Teardown: disconnect politely unless already gone."""
        if getattr(self, "killed", False):
            return
        try:
            self.disconnect()
        except Exception:
            self.c.loop_stop()
