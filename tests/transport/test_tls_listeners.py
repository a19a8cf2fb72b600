"""Secure WebSockets, the TLS version floor and certificate reload on SIGHUP: a real broker
process, real paho clients, certificates from a private CA (trustme)."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker.clients import wait_until
from brokerproc import BrokerProcess, free_port, wait_for_port
from paho.mqtt.enums import CallbackAPIVersion
from redisproc import TlsFiles

from .test_websocket_tls import _roundtrip


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return TlsFiles(tmp_path / "tls")


def _tls_broker(tls: TlsFiles, *args: str) -> BrokerProcess:
    return BrokerProcess(
        "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key), *args
    ).start()


def _serial(port: int, ca: Path) -> tuple[int, ssl.SSLSocket]:
    context = ssl.create_default_context(cafile=str(ca))
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                               server_hostname="127.0.0.1")  # fmt: skip
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number, sock


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_paho_over_secure_websocket(tls, protocol):
    port = free_port()
    broker = _tls_broker(tls, "--wss-bind", f"127.0.0.1:{port}")
    try:
        wait_for_port(port)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="wss", protocol=protocol, transport="websockets"
        )
        client.tls_set(ca_certs=str(tls.ca))
        got = _roundtrip(client, port)
        assert sorted(got) == [("t/big", b"x" * 70_000, 1), ("t/small", b"small", 0)]
    finally:
        broker.stop()


def test_tls12_client_refused_with_min_version_13(tls):
    port = free_port()
    broker = _tls_broker(tls, "--tls-bind", f"127.0.0.1:{port}", "--tls-min-version", "1.3")
    try:
        wait_for_port(port)
        old = ssl.create_default_context(cafile=str(tls.ca))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", port)) as raw:
            old.wrap_socket(raw, server_hostname="127.0.0.1")
        # A TLS 1.3 client (paho's default context) is served.
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="t13", protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(tls.ca))
        assert len(_roundtrip(client, port)) == 2
    finally:
        broker.stop()


def test_tls12_with_configured_ciphers(tls):
    port = free_port()
    broker = _tls_broker(tls, "--tls-bind", f"127.0.0.1:{port}", "--tls-ciphers", "ECDHE+CHACHA20")
    try:
        wait_for_port(port)
        client12 = ssl.create_default_context(cafile=str(tls.ca))
        client12.maximum_version = ssl.TLSVersion.TLSv1_2
        raw = socket.create_connection(("127.0.0.1", port))
        with client12.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            assert sock.version() == "TLSv1.2"
            assert "CHACHA20" in sock.cipher()[0]
        only_gcm = ssl.create_default_context(cafile=str(tls.ca))
        only_gcm.maximum_version = ssl.TLSVersion.TLSv1_2
        only_gcm.set_ciphers("ECDHE+AESGCM")
        with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", port)) as raw:
            only_gcm.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        broker.stop()


def test_sighup_swaps_the_certificate_for_new_connections_only(tls, tmp_path):
    port = free_port()
    broker = _tls_broker(tls, "--tls-bind", f"127.0.0.1:{port}")
    try:
        wait_for_port(port)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="old", protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(tls.ca))
        client.connect("127.0.0.1", port)
        client.loop_start()
        wait_until(client.is_connected, what="CONNACK")
        before, sock = _serial(port, tls.ca)
        sock.close()
        renewed = TlsFiles(tmp_path / "renewed")  # another CA and certificate
        shutil.copy(renewed.server_cert, tls.server_cert)
        shutil.copy(renewed.server_key, tls.server_key)
        broker.signal(signal.SIGHUP)
        wait_until(lambda: "certificate reloaded" in broker.log_text(), what="reload")
        after, sock = _serial(port, renewed.ca)
        sock.close()
        assert after != before
        with pytest.raises(ssl.SSLError):  # the old CA no longer verifies new handshakes
            _serial(port, tls.ca)
        time.sleep(0.2)
        assert client.is_connected()  # the connection made before the reload is still served
        info = client.publish("t/x", b"still", qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
        client.disconnect()
        client.loop_stop()
        assert broker.proc is not None and broker.proc.poll() is None
    finally:
        broker.stop()
