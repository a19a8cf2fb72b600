"""MQTT over WebSocket and over TLS, with real paho clients."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker.clients import wait_until
from brokerproc import BrokerProcess, broker_command, free_port, wait_for_port
from paho.mqtt.enums import CallbackAPIVersion


def _roundtrip(client: mqtt.Client, port: int) -> list[tuple[str, bytes, int]]:
    """Subscribe at QoS 1, publish a big QoS 1 and a small QoS 0 message, return what came back."""
    got: list[tuple[str, bytes, int]] = []
    subscribed: list[bool] = []
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload, m.qos))
    client.on_subscribe = lambda *args: subscribed.append(True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        wait_until(client.is_connected, what="CONNACK")
        client.subscribe("t/#", qos=1)
        wait_until(lambda: subscribed, what="SUBACK")
        big = client.publish("t/big", b"x" * 70_000, qos=1)  # spans many WebSocket/TLS records
        client.publish("t/small", b"small", qos=0)
        big.wait_for_publish(5)
        assert big.is_published()  # the PUBACK came back
        wait_until(lambda: len(got) >= 2, what="both messages")
    finally:
        client.disconnect()
        client.loop_stop()
    return got


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_mqtt_over_websocket(protocol):
    ws_port = free_port()
    broker = BrokerProcess("--ws-bind", f"127.0.0.1:{ws_port}").start()
    try:
        wait_for_port(ws_port)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="ws", protocol=protocol, transport="websockets"
        )
        got = _roundtrip(client, ws_port)
        assert sorted(got) == [("t/big", b"x" * 70_000, 1), ("t/small", b"small", 0)]
    finally:
        broker.stop()


def test_websocket_rejects_a_plain_http_request():
    ws_port = free_port()
    broker = BrokerProcess("--ws-bind", f"127.0.0.1:{ws_port}").start()
    try:
        wait_for_port(ws_port)
        with socket.create_connection(("127.0.0.1", ws_port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_mqtt_over_tls(certificate):
    cert, key = certificate
    tls_port = free_port()
    broker = BrokerProcess(
        "--tls-bind", f"127.0.0.1:{tls_port}", "--tls-cert", str(cert), "--tls-key", str(key)
    ).start()
    try:
        wait_for_port(tls_port)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls", protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        got = _roundtrip(client, tls_port)
        assert sorted(got) == [("t/big", b"x" * 70_000, 1), ("t/small", b"small", 0)]
    finally:
        broker.stop()


def test_tls_listener_needs_a_certificate():
    result = subprocess.run(
        [*broker_command(), "--tls-bind", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--tls-cert" in result.stderr
