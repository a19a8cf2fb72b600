"""One client connection, sans-IO: bytes in through `receive_data`, bytes out through `out`.

Theory of operation. The asyncio shell owns the socket and hands every received chunk to
`receive_data`. This object decodes packets and acts on them against the `Broker` (sessions,
routing, retained messages); whatever must go back to this client, or to any other client as a
delivery, is appended to that connection's `out` buffer, and `link.kick()` asks the shell to
flush it soon (once per loop iteration, however many packets were written). When the protocol
says the connection ends, `link.close()` asks the shell to flush and close; the shell reports
the end with `connection_lost()`, which is where wills and session expiry are decided.

Protocol errors raise `ProtocolError`; they are answered with CONNACK (before the session is
up) or DISCONNECT (5.0) carrying the reason code, then the connection closes (MQTT-4.13.1-1;
3.1.1 closes without a word, MQTT-4.8.0-1).

Versions: MQTT 3.1 (`MQIsdp`, level 3) is handled as 3.1.1 except for its client identifier
rule (1 to 23 characters), its CONNACK (no session-present flag) and its SUBACK (no failure
code). Everything written to a 5.0 client respects its Maximum Packet Size (MQTT-3.1.2-24).

Enhanced authentication (5.0 section 4.12, SCRAM-SHA-256 only, `core.scram`): a CONNECT with an
Authentication Method keeps the connection CONNECTING while AUTH packets go back and forth
(`scram` holds the exchange); its success goes on as a password's would (`_admit`). A connected
client re-authenticates with AUTH 0x19 while its traffic goes on; a failure ends the connection.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from ..mqtt.codec import (
    MQTT_5,
    MQTT_31,
    MQTT_311,
    Decoder,
    UnsupportedProtocolVersion,
    decode_publish_header,
    encode,
)
from ..mqtt.errors import MalformedPacket, ProtocolError
from ..mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from ..mqtt.primitives import encode_varint, varint_size
from ..mqtt.properties import EMPTY_PROPERTIES, Properties
from ..mqtt.reason_codes import ReasonCode, connack_code_311
from ..mqtt.topics import is_valid_topic_filter, split_shared
from .auth import BAD_METHOD, SUBSCRIBE, WRITE, Authorizer, Credentials, Decision, Outcome
from .limits import new_throttle
from .message import Message
from .scram import METHOD as SCRAM_METHOD
from .scram import Lookup, ScramError, ScramExchange
from .session import AWAITING_COMP, NEVER_EXPIRES, Session, SessionSnapshot
from .trie import Subscription

if TYPE_CHECKING:
    from .broker import Broker

WRITE_DENY = (WRITE, "deny")

# LOCATING: CONNECT accepted, waiting for the cluster to hand over the session (no packet is
# processed meanwhile; they wait in the decoder). Below CLOSED means "still reading".
CONNECTING, CONNECTED, CLOSED, LOCATING = 0, 1, 3, 2

_PINGRESP = b"\xd0\x00"
_NO_OUTPUT = b""
# Never written to: see `alias_in` / `alias_out`.
_NO_ALIASES: dict[Any, Any] = {}
# A cluster stores a session before its PUBREL only while its queue is at most this long.
STORE_BEFORE_RELEASE_MAX_QUEUE = 100

log = logging.getLogger("mcloudtt.auth")


class Link(Protocol):
    """What the shell offers a connection: a flush request and a close request."""

    def kick(self) -> None: ...
    def close(self) -> None: ...


class ServerConnection:
    __slots__ = (
        "alias_in",
        "alias_out",
        "alias_out_max",
        "auth_method",
        "auth_reply",
        "broker",
        "client_id",
        "congested",
        "connect_args",
        "created_at",
        "decoder",
        "keep_alive",
        "last_received",
        "link",
        "max_packet_out",
        "out",
        "problem_info",
        "refusal",
        "rights",
        "scram",
        "send_quota",
        "session",
        "state",
        "throttle",
        "topic_limits",
        "username",
        "version",
        "will",
        "will_delay",
        "will_on_close",
    )

    def __init__(self, broker: Broker, link: Link, now: float) -> None:
        self.broker = broker
        self.link = link
        self.decoder = Decoder(max_packet_size=broker.settings.max_packet_size)
        # Output waiting for the shell's flush: the shared empty `_NO_OUTPUT` between flushes
        # (an idle connection's empty bytearray was 56 bytes), a bytearray of its own from the
        # first write on, which `take_output` hands over.
        self.out: bytearray | bytes = _NO_OUTPUT
        self.state = CONNECTING
        self.version = MQTT_311
        self.client_id = ""
        self.username: str | None = None
        self.rights: Authorizer | None = None
        # Enhanced authentication: the CONNECT's method, the exchange under way, and the
        # server-final message for the CONNACK.
        self.auth_method: str | None = None
        self.scram: ScramExchange | None = None
        self.auth_reply: bytes | None = None
        self.session: Session | None = None
        self.created_at = now
        self.last_received = now
        self.keep_alive = 0
        self.send_quota = broker.settings.max_inflight
        self.max_packet_out = 0  # client's Maximum Packet Size; 0 = no limit
        # Topic aliases (5.0) are rare: a shared empty dict until the first one is set.
        self.alias_in: dict[int, str] = _NO_ALIASES
        self.alias_out: dict[str, int] = _NO_ALIASES
        self.alias_out_max = 0
        self.problem_info = True
        self.congested = False
        self.will: Message | None = None
        self.will_on_close = True  # cleared by DISCONNECT 0x00 (MQTT-3.1.2-10)
        self.will_delay = 0
        self.connect_args: tuple[Connect, str | None, Message | None] | None = None
        # Limits: the shell sets `refusal` when a connection limit refuses this CONNECT;
        # `throttle` is None (no per-message work) unless a publish rate or bandwidth is set.
        self.refusal: ReasonCode | None = None
        self.throttle = new_throttle(broker.settings, now)
        self.topic_limits = bool(
            broker.settings.max_topic_length or broker.settings.max_topic_levels
        )

    # ---------------------------------------------------------------- input

    def receive_data(self, data: bytes, now: float) -> None:
        if self.state == CLOSED:
            return
        self.last_received = now
        self.broker.stats.bytes_received += len(data)
        throttle = self.throttle
        decoder = self.decoder
        decoder.feed(data)
        try:
            while self.state < LOCATING:
                frame = decoder.next_frame()
                if frame is None:
                    break
                packet_type, flags, buffer, start, stop = frame
                if packet_type == 3:
                    # Hot path: straight from the frame to a Message, no Publish object.
                    topic, packet_id, props, payload_at = decode_publish_header(
                        flags, buffer, start, stop, self.version
                    )
                    self._on_publish(
                        topic,
                        buffer[payload_at:stop],
                        (flags >> 1) & 0x03,
                        bool(flags & 0x01),
                        packet_id,
                        props,
                        now,
                    )
                    if throttle is not None and throttle.on_publish(stop - start, now):
                        # Over its publish rate or bandwidth: the rest waits in the decoder
                        # until the shell, having paused reading for `throttle.wait`, calls
                        # again (slowed, never dropped).
                        break
                elif packet_type == 4 and stop - start == 2:
                    self._on_puback((buffer[start] << 8) | buffer[start + 1], now)
                else:
                    self._dispatch(decoder.decode_frame(*frame), now)
        except ProtocolError as error:
            self._protocol_error(error)

    def _dispatch(self, packet: Packet, now: float) -> None:
        if self.state == CONNECTING and self.connect_args is not None:
            # Between a CONNECT with an Authentication Method and its CONNACK only AUTH and
            # DISCONNECT may come (MQTT-3.1.2-30 / 5.0 section 4.12).
            if not isinstance(packet, Auth | Disconnect):
                raise ProtocolError(f"{type(packet).__name__} during enhanced authentication")
            if isinstance(packet, Disconnect):
                self.will_on_close = False
                self._end()
                return
        if isinstance(packet, PubAck):
            self._on_puback(packet.packet_id, now)
        elif isinstance(packet, PubRec):
            self._on_pubrec(packet, now)
        elif isinstance(packet, PubComp):
            self._on_pubcomp(packet, now)
        elif isinstance(packet, PubRel):
            self._on_pubrel(packet)
        elif isinstance(packet, PingReq):
            self._write(_PINGRESP)  # MQTT-3.12.4-1
        elif isinstance(packet, Subscribe):
            self._on_subscribe(packet, now)
        elif isinstance(packet, Unsubscribe):
            self._on_unsubscribe(packet)
        elif isinstance(packet, Connect):
            self._on_connect(packet, now)
        elif isinstance(packet, Disconnect):
            self._on_disconnect(packet)
        elif isinstance(packet, Auth):
            self._on_auth(packet, now)
        else:
            raise ProtocolError(f"a client must not send {type(packet).__name__}")

    # ---------------------------------------------------------------- output

    def _write(self, data: bytes | bytearray) -> None:
        out = self.out
        if not out:
            self.link.kick()
            self.out = bytearray(data)
        else:
            out += data

    def send_packet(self, packet: Packet) -> bool:
        """Write a non-PUBLISH packet; False when it could not be sent and the connection closed."""
        if self.max_packet_out:
            return self._send_limited(packet)
        out: bytearray = self.out  # type: ignore[assignment]  # only b"" when empty
        if not out:
            self.link.kick()
            out = self.out = bytearray()
        encode(packet, self.version, out)
        return True

    def _send_limited(self, packet: Packet) -> bool:
        """Send within the client's Maximum Packet Size (MQTT-3.1.2-24), or close without it."""
        wire = bytearray()
        encode(packet, self.version, wire)
        if len(wire) > self.max_packet_out:
            props: Properties = getattr(packet, "properties", EMPTY_PROPERTIES)
            if props.reason_string is not None or props.user_properties:
                # The Reason String and User Properties go first: a sender must not send them
                # if they make the packet too large (MQTT-3.2.2-19/20, MQTT-3.4.2-2/3,
                # MQTT-3.5.2-2/3, MQTT-3.6.2-2/3, MQTT-3.7.2-2/3, MQTT-3.9.2-1/2,
                # MQTT-3.11.2-1/2, MQTT-3.14.2-3/4).
                lean = props.replace(reason_string=None, user_properties=())
                if lean == EMPTY_PROPERTIES:
                    lean = EMPTY_PROPERTIES
                lean_packet = dataclasses.replace(packet, properties=lean)  # type: ignore[arg-type]
                wire.clear()
                encode(lean_packet, self.version, wire)
        if len(wire) > self.max_packet_out:
            # Even its smallest form does not fit: never sent (MQTT-3.1.2-24). The exchange
            # cannot go on without it (a CONNACK, SUBACK, acknowledgement or DISCONNECT), so
            # the connection closes.
            self.broker.stats.oversized_closes += 1
            self._end()
            return False
        self._write(wire)
        return True

    def take_output(self) -> bytearray | bytes:
        data = self.out
        self.out = _NO_OUTPUT
        self.broker.stats.bytes_sent += len(data)
        return data

    def write_pubrel(self, packet_id: int) -> None:
        self._write(bytes((0x62, 2, packet_id >> 8, packet_id & 0xFF)))

    def write_publish(
        self,
        message: Message,
        qos: int,
        retain: bool,
        packet_id: int,
        dup: bool,
        identifiers: tuple[int, ...],
    ) -> bool:
        """Write one delivery; False when it was dropped for the client's Maximum Packet Size."""
        v5 = self.version == MQTT_5
        stats = self.broker.stats
        if not dup and not (
            v5 and (identifiers or self.alias_out_max or message.expires_at is not None)
        ):
            topic_wire = message.topic_wire
            payload = message.payload
            props_wire = message.properties_wire if v5 else b""
            length = len(topic_wire) + len(props_wire) + len(payload) + (2 if qos else 0)
            if self.max_packet_out and length + 5 > self.max_packet_out:
                if 1 + varint_size(length) + length > self.max_packet_out:
                    stats.dropped["packet_too_large"] += 1  # MQTT-3.1.2-25
                    return False
            out: bytearray = self.out  # type: ignore[assignment]  # only b"" when empty
            if not out:
                self.link.kick()
                out = self.out = bytearray()
            out.append(0x30 | (qos << 1) | (1 if retain else 0))
            if length < 128:
                out.append(length)
            else:
                encode_varint(length, out)
            out += topic_wire
            if qos:
                out += packet_id.to_bytes(2, "big")
            if v5:
                out += props_wire
            out += payload
            stats.messages_sent[qos] += 1
            return True
        topic = message.topic
        props = message.properties
        if v5:
            changes: dict[str, object] = {}
            if identifiers:
                changes["subscription_identifiers"] = identifiers  # MQTT-3.3.4-3
            if message.expires_at is not None:
                changes["message_expiry_interval"] = message.remaining_expiry(self.broker.clock())
            if self.alias_out_max:
                alias = self.alias_out.get(topic)
                if alias is not None:
                    changes["topic_alias"] = alias
                    topic = ""
                elif len(self.alias_out) < self.alias_out_max:
                    if self.alias_out is _NO_ALIASES:
                        self.alias_out = {}
                    alias = len(self.alias_out) + 1
                    self.alias_out[topic] = alias
                    changes["topic_alias"] = alias
            if changes:
                props = props.replace(**changes)
        packet = Publish(
            topic=topic,
            payload=message.payload,
            qos=qos,
            retain=retain,
            dup=dup,
            packet_id=packet_id if qos else None,
            properties=props,
        )
        wire = bytearray()
        encode(packet, self.version, wire)
        if self.max_packet_out and len(wire) > self.max_packet_out:
            stats.dropped["packet_too_large"] += 1
            return False
        self._write(wire)
        stats.messages_sent[qos] += 1
        return True

    # ---------------------------------------------------------------- CONNECT

    def _on_connect(self, packet: Connect, now: float) -> None:
        broker = self.broker
        self.version = version = packet.protocol_level
        props = packet.properties
        v5 = version == MQTT_5
        method = props.authentication_method
        if method is None and props.authentication_data is not None:
            # MQTT 5.0 section 3.1.2.11.10: Authentication Data without a method.
            raise ProtocolError("authentication data without an authentication method")
        if method is not None and (method != SCRAM_METHOD or not broker.auth.scram):
            # Enhanced authentication: only SCRAM-SHA-256, and only with a credential store in
            # the chain; else 0x8C Bad authentication method (MQTT-4.12.0-1).
            broker.stats.auth[BAD_METHOD.label] += 1
            self._refuse(ReasonCode.BAD_AUTHENTICATION_METHOD)
            return
        if version == MQTT_31 and not broker.settings.mqtt31:
            raise UnsupportedProtocolVersion(version)  # refused by --mqtt31 false: CONNACK 0x01
        if v5:
            self.max_packet_out = props.maximum_packet_size or 0
        if self.refusal is not None:
            # A connection limit (counted by the shell): 5.0 0x97 Quota exceeded, 3.1.1 0x03.
            self._refuse(self.refusal)
            return
        client_id = packet.client_id
        if version == MQTT_31 and not 1 <= len(client_id) <= 23:
            # MQTT 3.1 section 3.1: the Client Identifier is 1 to 23 characters; return code 2.
            self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID)
            return
        assigned = None
        if not client_id:
            if not v5 and not packet.clean_start:
                self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID)  # MQTT-3.1.3-8
                return
            client_id = assigned = f"auto-{uuid.uuid4().hex}"  # MQTT-3.1.3-6
        will = packet.will
        will_message = None
        if will is not None:
            if not will.topic or "+" in will.topic or "#" in will.topic:
                raise ProtocolError("invalid will topic", ReasonCode.TOPIC_NAME_INVALID)
            expiry = will.properties.message_expiry_interval
            will_message = Message(
                will.topic,
                will.payload,
                will.qos,
                will.retain,
                will.properties.replace(will_delay_interval=None)
                if will.properties.will_delay_interval is not None
                else will.properties,
                expires_at=None if expiry is None else now + expiry,
                origin=client_id,
            )
            self.will_delay = will.properties.will_delay_interval or 0
        self.client_id = client_id
        self.connect_args = (packet, assigned, will_message)
        if method is not None:
            self.auth_method = method
            self._scram_begin(props.authentication_data, reauth=False)
            return
        # The chain may answer later (a lookup in Redis), the cluster may have to hand the
        # session over: meanwhile nothing else is processed (packets wait in the decoder).
        self.state = LOCATING
        credentials = Credentials(
            client_id, packet.username, packet.password, getattr(self.link, "cert_names", ())
        )
        decision = broker.auth.decide(credentials, self._authenticated)
        if decision is not None:
            self._admit(decision, now)

    def _authenticated(self, decision: Decision) -> None:
        """The chain's answer, come later."""
        if self.state != LOCATING or self.connect_args is None:
            return  # the connection closed meanwhile
        now = self.broker.clock()
        self._admit(decision, now)
        if self.state == CONNECTED:
            self.receive_data(b"", now)  # packets that arrived while the chain was asked

    def _admit(self, decision: Decision, now: float) -> None:
        """Second step of CONNECT: the chain decided; refuse, or go on to locate the session."""
        broker = self.broker
        assert self.connect_args is not None
        packet, assigned, will_message = self.connect_args
        broker.stats.auth[decision.label] += 1
        if not decision.allowed:
            # Who and why, never the password.
            log.info(
                "CONNECT refused: client %r, user %r: %s",
                self.client_id,
                packet.username,
                decision.label,
            )
            self.connect_args = None
            self._refuse(decision.reason)
            return
        self.username = decision.username or packet.username
        self.rights = decision.rights
        authorizer = self.rights or broker.authorizer
        if (
            will_message is not None
            and authorizer is not None
            and not authorizer.allowed(self.client_id, self.username, WRITE, will_message.topic)
        ):
            # A will the client could not publish itself is refused with the CONNECT.
            broker.stats.acl_other[WRITE_DENY] += 1
            self.connect_args = None
            self._refuse(ReasonCode.NOT_AUTHORIZED)
            return
        if self.max_packet_out:
            _, _, ack_props = self._accept_terms(packet, assigned)
            wire = bytearray()
            encode(ConnAck(session_present=True, properties=ack_props), self.version, wire)
            if len(wire) > self.max_packet_out:
                # MQTT-3.1.2-24: not even our CONNACK fits the client's limit (nothing in it may
                # be left out), so the connection closes without one, before any session work.
                self.broker.stats.oversized_closes += 1
                self.will_on_close = False
                self._end()
                return
        # Cluster: the session may live on another broker; CONNACK waits for it.
        if broker.bus.locate_session(self.client_id, packet.clean_start, self._located):
            return
        self.state = CONNECTING
        self.finish_connect(None, now)

    def _located(self, snapshot: SessionSnapshot | ReasonCode | None) -> None:
        if isinstance(snapshot, ReasonCode):
            # The cluster could not look for the session: refused, not started afresh.
            if self.state == LOCATING and self.connect_args is not None:
                self.connect_args = None
                self._refuse(snapshot)
            return
        self.finish_connect(snapshot, self.broker.clock())

    def finish_connect(self, snapshot: SessionSnapshot | None, now: float) -> None:
        """Second half of CONNECT: attach (or restore) the session and send CONNACK."""
        if self.state == CLOSED or self.connect_args is None:
            if snapshot is not None and self.connect_args is not None:
                # The client gave up waiting for its CONNACK, but its session came: the
                # registry names this broker now, so it stays here, offline, not lost.
                self.connect_args = None
                self.broker.keep_session(snapshot, now)
            return
        resumed_later = self.state == LOCATING
        packet, assigned, will_message = self.connect_args
        self.connect_args = None
        broker = self.broker
        settings = broker.settings
        version = self.version
        v5 = version == MQTT_5
        props = packet.properties
        client_id = self.client_id
        self.keep_alive, expiry, ack_props = self._accept_terms(packet, assigned)

        session, present = broker.attach_session(self, client_id, packet.clean_start, now, snapshot)
        session.version = version
        session.expiry_interval = expiry
        if session.username != self.username or session.rights is not self.rights:
            session.username = self.username
            session.rights = self.rights
            session.forget_decisions()
        self.session = session
        self.state = CONNECTED
        self.will = will_message
        if will_message is not None:
            # A cluster bus stores the will due if this broker dies now (`will_of`), at once.
            broker.bus.session_changed(client_id)
        self.problem_info = props.request_problem_information != 0
        if v5:
            self.send_quota = min(props.receive_maximum or 65_535, settings.max_inflight)
            self.alias_out_max = min(props.topic_alias_maximum or 0, settings.topic_alias_maximum)
        # MQTT 3.1 has no session-present flag: that CONNACK byte is reserved there.
        ack = ConnAck(
            session_present=present and version != MQTT_31, reason_code=0, properties=ack_props
        )
        if not self.send_packet(ack):
            return
        if present:
            session.resend_inflight()
        session.pump(now)
        if resumed_later:
            self.receive_data(b"", now)  # packets that arrived while the session was located

    def _accept_terms(self, packet: Connect, assigned: str | None) -> tuple[int, int, Properties]:
        """Keep alive, session expiry granted, and the properties of a success CONNACK."""
        settings = self.broker.settings
        v5 = packet.protocol_level == MQTT_5
        keep_alive = packet.keep_alive
        server_keep_alive = None
        if settings.max_keepalive and (keep_alive == 0 or keep_alive > settings.max_keepalive):
            if v5:
                keep_alive = server_keep_alive = settings.max_keepalive  # MQTT-3.2.2-21
        if v5:
            requested_expiry = packet.properties.session_expiry_interval or 0
        else:
            requested_expiry = 0 if packet.clean_start else NEVER_EXPIRES
        expiry = min(requested_expiry, settings.max_session_expiry)
        if not v5:
            return keep_alive, expiry, EMPTY_PROPERTIES
        values: dict[str, object] = {
            "receive_maximum": settings.receive_maximum,
            "topic_alias_maximum": settings.topic_alias_maximum,
            "maximum_packet_size": settings.max_packet_size,
        }
        if assigned is not None:
            values["assigned_client_identifier"] = assigned
        if self.auth_method is not None:
            # MQTT-4.12.0-5: the method of the CONNECT; the data is the server-final message,
            # which proves to the client that the server knows its credential.
            values["authentication_method"] = self.auth_method
            values["authentication_data"] = self.auth_reply
        if server_keep_alive is not None:
            values["server_keep_alive"] = server_keep_alive
        if expiry != requested_expiry:
            # The server tells the value it uses instead of the client's (5.0 section 3.2.2.3.2).
            values["session_expiry_interval"] = expiry
        return keep_alive, expiry, Properties(**values)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- AUTH (5.0 section 4.12)

    def _on_auth(self, packet: Auth, now: float) -> None:
        props = packet.properties
        if self.auth_method is None:
            # No Authentication Method in the CONNECT: no AUTH may follow (MQTT-4.12.0-7).
            raise ProtocolError("AUTH without an authentication method")
        if props.authentication_method != self.auth_method:
            # MQTT-4.12.0-5, re-authentication MQTT-4.12.1-1: the method of the CONNECT.
            raise ProtocolError("AUTH with another authentication method")
        code = packet.reason_code
        exchange = self.scram
        if code == ReasonCode.RE_AUTHENTICATE:
            if self.state != CONNECTED or exchange is not None:
                # Only after CONNACK and not while one is under way (MQTT-4.12.1-1).
                raise ProtocolError("re-authentication out of turn")
            self._scram_begin(props.authentication_data, reauth=True)
            return
        if code != ReasonCode.CONTINUE_AUTHENTICATION or exchange is None:
            raise ProtocolError("unexpected AUTH")
        try:
            reply = exchange.server_final(props.authentication_data)
        except ScramError as error:
            self._scram_failed(exchange, str(error))
            return
        self.scram = None
        if exchange.reauth:
            self.broker.stats.auth["reauth_success"] += 1
            if exchange.rights is not self.rights and self.session is not None:
                # Fresh rights from the store (a Redis user's): earlier decisions are stale.
                self.rights = self.session.rights = exchange.rights
                self.session.forget_decisions()
            self.send_packet(
                Auth(
                    reason_code=ReasonCode.SUCCESS,
                    properties=Properties(
                        authentication_method=self.auth_method, authentication_data=reply
                    ),
                )
            )
            return
        self.auth_reply = reply
        self.state = LOCATING
        self._admit(
            Decision(True, ReasonCode.SUCCESS, "success", exchange.username, exchange.rights), now
        )

    def _scram_begin(self, client_first: bytes | None, *, reauth: bool) -> None:
        try:
            exchange = ScramExchange(client_first, reauth=reauth)
        except ScramError as error:
            raise ProtocolError(f"SCRAM: {error}") from None
        if reauth and exchange.username != self.username:
            # A session keeps the identity it was authorised with: another user is a failure.
            self._scram_failed(exchange, "another user")
            return
        self.scram = exchange
        found = self.broker.auth.scram_lookup(
            exchange.username, lambda lookup: self._scram_found(exchange, lookup)
        )
        if found is not None:
            self._scram_found(exchange, found)

    def _scram_found(self, exchange: ScramExchange, lookup: Lookup) -> None:
        """The store's answer (maybe later): send the server-first message."""
        if self.scram is not exchange or self.state == CLOSED:
            return  # the connection closed meanwhile
        outcome, credential, rights = lookup
        if outcome == Outcome.UNAVAILABLE:
            self._scram_failed(exchange, "credential store unavailable", unavailable=True)
            return
        exchange.rights = rights
        try:
            first = exchange.server_first(credential if outcome == Outcome.ALLOW else None)
        except ScramError as error:
            self._scram_failed(exchange, str(error))
            return
        self.send_packet(
            Auth(
                reason_code=ReasonCode.CONTINUE_AUTHENTICATION,
                properties=Properties(
                    authentication_method=self.auth_method, authentication_data=first
                ),
            )
        )

    def _scram_failed(
        self, exchange: ScramExchange, why: str, *, unavailable: bool = False
    ) -> None:
        self.scram = None
        stats = self.broker.stats
        log.info(
            "SCRAM %s failed: client %r, user %r: %s",
            "re-authentication" if exchange.reauth else "authentication",
            self.client_id,
            exchange.username,
            why,
        )
        if exchange.reauth:
            # MQTT-4.12.1-2: DISCONNECT with a reason code, then close (0x87: 0x86 is not a
            # DISCONNECT reason code).
            stats.auth["reauth_failure"] += 1
            reason = ReasonCode.UNSPECIFIED_ERROR if unavailable else ReasonCode.NOT_AUTHORIZED
            self.disconnect(reason, publish_will=True)
            return
        # MQTT-4.12.0-4: refused with a CONNACK of 0x80 or above, then closed.
        label = "server_unavailable" if unavailable else "bad_username_or_password"
        stats.auth[label] += 1
        self.connect_args = None
        self._refuse(
            ReasonCode.SERVER_UNAVAILABLE if unavailable else ReasonCode.BAD_USER_NAME_OR_PASSWORD
        )

    def _refuse(self, reason: ReasonCode) -> None:
        """Answer a CONNECT with an error CONNACK and close (MQTT-3.2.2-6: no session present)."""
        code = int(reason) if self.version == MQTT_5 else connack_code_311(reason)
        self.send_packet(ConnAck(session_present=False, reason_code=code))
        self.will_on_close = False
        self._end()

    # ---------------------------------------------------------------- PUBLISH in

    def _on_publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        packet_id: int | None,
        props: Properties,
        now: float,
    ) -> None:
        if self.state != CONNECTED:
            raise ProtocolError("PUBLISH before CONNECT")
        session = self.session
        assert session is not None
        broker = self.broker
        expires_at = None
        if props is not EMPTY_PROPERTIES:
            alias = props.topic_alias
            if alias is not None:
                if alias > broker.settings.topic_alias_maximum:
                    raise ProtocolError("topic alias out of range", ReasonCode.TOPIC_ALIAS_INVALID)
                if topic:
                    if self.alias_in is _NO_ALIASES:
                        self.alias_in = {}
                    self.alias_in[alias] = topic  # a new or changed mapping (MQTT 5.0 3.3.2.3.4)
                else:
                    mapped = self.alias_in.get(alias)
                    if mapped is None:
                        raise ProtocolError("unknown topic alias")
                    topic = mapped
                props = props.replace(topic_alias=None)
                if props == EMPTY_PROPERTIES:
                    props = EMPTY_PROPERTIES
            if props.subscription_identifiers:
                # MQTT-3.3.4-6: a client never sends a Subscription Identifier.
                raise ProtocolError("PUBLISH from a client with a subscription identifier")
            if props.message_expiry_interval is not None:
                expires_at = now + props.message_expiry_interval
        if not topic:
            # MQTT 5.0 section 3.3.2.1: an empty topic without a Topic Alias is a protocol error.
            raise ProtocolError("empty topic name without a topic alias")
        if "+" in topic or "#" in topic:
            # MQTT-3.3.2-2
            raise ProtocolError(f"invalid topic name {topic!r}", ReasonCode.TOPIC_NAME_INVALID)
        if self.topic_limits:
            limit = self._topic_over_limit(topic)
            if limit:
                # 5.0: DISCONNECT 0x90 Topic Name invalid; 3.1.1: the connection closes.
                raise ProtocolError(f"topic over the {limit} limit", ReasonCode.TOPIC_NAME_INVALID)
        if qos == 2:
            assert packet_id is not None
            if packet_id in session.awaiting_release:
                # A resend of a message already delivered (method B of MQTT 4.3.3): ack again.
                self._write(bytes((0x50, 2, packet_id >> 8, packet_id & 0xFF)))
                return
            if len(session.awaiting_release) >= broker.settings.receive_maximum:
                raise ProtocolError(
                    "more QoS 2 messages in flight than Receive Maximum",
                    ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                )  # MQTT-3.3.4-9
        broker.stats.messages_received[qos] += 1
        allowed = topic[0] != "$" or broker.authorize_publish(self.client_id, topic)
        if allowed and broker.authorizer is not None:
            # Inline cache lookup: one dict get per publish once the topic was decided.
            allowed_here = session.acl_cache.get(topic)
            if allowed_here is None:
                allowed_here = broker.may(session, WRITE, topic)
            else:
                if allowed_here:
                    broker.stats.write_allowed += 1
                else:
                    broker.stats.acl_other[WRITE_DENY] += 1
            if not allowed_here:
                allowed = False
                if broker.settings.acl_deny_action == "disconnect":
                    self.disconnect(ReasonCode.NOT_AUTHORIZED, publish_will=True)
                    return
        if allowed:
            broker.publish(
                Message(
                    topic, payload, qos, retain, props, expires_at=expires_at, origin=self.client_id
                )
            )
        if qos == 1:
            assert packet_id is not None
            if allowed or self.version != MQTT_5:
                self._write(bytes((0x40, 2, packet_id >> 8, packet_id & 0xFF)))
            else:
                self.send_packet(PubAck(packet_id=packet_id, reason_code=ReasonCode.NOT_AUTHORIZED))
        elif qos == 2:
            assert packet_id is not None
            if allowed or self.version != MQTT_5:
                session.hold_release(packet_id)
                self._write(bytes((0x50, 2, packet_id >> 8, packet_id & 0xFF)))
            else:
                self.send_packet(PubRec(packet_id=packet_id, reason_code=ReasonCode.NOT_AUTHORIZED))

    def _on_pubrel(self, packet: PubRel) -> None:
        session = self._connected_session()
        pid = packet.packet_id
        if pid in session.awaiting_release:
            session.awaiting_release -= {pid}  # a frozenset stays one; a set shrinks in place
            self._write(bytes((0x70, 2, pid >> 8, pid & 0xFF)))
        elif self.version == MQTT_5:
            self.send_packet(
                PubComp(packet_id=pid, reason_code=ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)
            )
        else:
            self._write(bytes((0x70, 2, pid >> 8, pid & 0xFF)))

    # ---------------------------------------------------------------- acks of our PUBLISH

    # An acknowledgement that matches no flow of ours is a protocol error: 5.0 answers DISCONNECT
    # 0x82 (section 4.13.1), 3.1.1 closes (MQTT-4.8.0-1); PUBREC and PUBREL for an unknown id get
    # the 0x92 answer the spec names instead (5.0 sections 3.6.2.1, 3.7.2.1). The duplicates a
    # reconnect brings stay accepted: the flows resent on resume (MQTT-4.4.0-1) are still in
    # `inflight` under their ids, a repeated PUBREC is answered with PUBREL again, and a
    # repeated PUBREL with PUBCOMP.

    def _wrong_ack(self, kind: str) -> NoReturn:
        self.broker.stats.wrong_acks[kind] += 1
        raise ProtocolError(f"unexpected acknowledgement: {kind.replace('_', ' ')}")

    def _on_puback(self, packet_id: int, now: float) -> None:
        session = self._connected_session()
        entry = session.inflight.get(packet_id)
        if entry is not None and entry.qos == 1:
            del session.inflight[packet_id]
            if session.queue:
                session.pump(now)
        else:
            self._wrong_ack("puback_unknown" if entry is None else "puback_for_qos2")

    def _on_pubrec(self, packet: PubRec, now: float) -> None:
        session = self._connected_session()
        pid = packet.packet_id
        entry = session.inflight.get(pid)
        if entry is None:
            if self.version == MQTT_5:
                self.send_packet(
                    PubRel(packet_id=pid, reason_code=ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)
                )
            else:
                self.write_pubrel(pid)
            return
        if entry.qos != 2:
            self._wrong_ack("pubrec_for_qos1")
        if packet.reason_code >= 0x80:
            # The receiver refused it: no PUBREL (MQTT-4.3.3-4), never resent (MQTT-4.4.0-2).
            del session.inflight[pid]
            session.pump(now)
            return
        entry.state = AWAITING_COMP
        # In a cluster the session is stored first: restored elsewhere, it must send PUBREL,
        # not the PUBLISH again, or the client would deliver it twice.
        # (Not behind a long queue: storing it on every PUBREC would cost more than it saves.)
        if not (
            session.expiry_interval
            and len(session.queue) <= STORE_BEFORE_RELEASE_MAX_QUEUE
            and self.broker.bus.release_after_store(session.client_id, pid)
        ):
            self.write_pubrel(pid)

    def _on_pubcomp(self, packet: PubComp, now: float) -> None:
        session = self._connected_session()
        entry = session.inflight.get(packet.packet_id)
        if entry is not None and entry.state == AWAITING_COMP:
            del session.inflight[packet.packet_id]
            if session.queue:
                session.pump(now)
            if session.expiry_interval and session.completed is not None:
                session.completed(session.client_id)
        elif entry is not None and entry.qos == 1:
            self._wrong_ack("pubcomp_for_qos1")
        else:
            self._wrong_ack("pubcomp_unknown")  # no flow, or no PUBREL sent for it yet

    # ---------------------------------------------------------------- SUBSCRIBE / UNSUBSCRIBE

    def _on_subscribe(self, packet: Subscribe, now: float) -> None:
        session = self._connected_session()
        broker = self.broker
        v5 = self.version == MQTT_5
        identifier = None
        if packet.properties.subscription_identifiers:
            identifier = packet.properties.subscription_identifiers[0]
        if v5 or self.version == MQTT_31:
            for request in packet.subscriptions:
                _check_filter(request.topic_filter, v5)
        codes: list[int] = []
        retained_to_send: list[tuple[Subscription[Session], str]] = []
        for request in packet.subscriptions:
            full_filter = request.topic_filter
            try:
                group, inner = split_shared(full_filter)
            except ValueError:
                codes.append(0x80)  # 3.1.1: Failure (MQTT-3.8.4-5)
                continue
            if not is_valid_topic_filter(inner):
                codes.append(0x80)
                continue
            if broker.authorizer is not None and not broker.may(session, SUBSCRIBE, inner):
                if broker.settings.acl_deny_action == "disconnect" or self.version == MQTT_31:
                    # MQTT 3.1's SUBACK has no failure code: the connection closes instead.
                    self.disconnect(ReasonCode.NOT_AUTHORIZED, publish_will=True)
                    return
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else 0x80)  # MQTT-3.9.3-2
                continue
            refused = self._subscription_over_limit(session, full_filter, inner)
            if refused:
                codes.append(refused)
                continue
            if group is not None and request.no_local:
                raise ProtocolError("No Local on a shared subscription")  # MQTT-3.8.3-4
            sub: Subscription[Session] = Subscription(
                session=session,
                topic_filter=full_filter,
                qos=request.qos,
                no_local=request.no_local,
                retain_as_published=request.retain_as_published,
                retain_handling=request.retain_handling,
                identifier=identifier,
                share_group=group,
            )
            existed = broker.subscribe(session, sub, inner)
            codes.append(request.qos)
            # Retained messages: not for shared subscriptions (5.0 sections 3.3.1.3, 4.8.2), and
            # per Retain Handling: 0 always, 1 only for a new subscription, 2 never
            # (MQTT-3.3.1-9..11).
            if group is None and (
                request.retain_handling == 0 or (request.retain_handling == 1 and not existed)
            ):
                retained_to_send.append((sub, inner))
        if not self.send_packet(SubAck(packet_id=packet.packet_id, reason_codes=tuple(codes))):
            return
        for sub, inner in retained_to_send:
            broker.send_retained(session, sub, inner, now)

    def _topic_over_limit(self, topic: str) -> str:
        """The limit a topic name or filter breaks ('' for none), counted."""
        settings = self.broker.settings
        limit = ""
        if settings.max_topic_length and len(topic.encode()) > settings.max_topic_length:
            limit = "topic_length"
        elif settings.max_topic_levels and topic.count("/") >= settings.max_topic_levels:
            limit = "topic_levels"
        if limit:
            self.broker.stats.limited[limit] += 1
        return limit

    def _subscription_over_limit(self, session: Session, full_filter: str, inner: str) -> int:
        """The SUBACK failure code for a filter over a limit, 0 when within them."""
        v5 = self.version == MQTT_5
        if self.topic_limits and self._topic_over_limit(inner):
            code = ReasonCode.TOPIC_FILTER_INVALID if v5 else 0x80
        else:
            limit = self.broker.settings.max_subscriptions
            if not limit or session.subscription(full_filter) is not None:
                return 0
            if session.subscription_count() < limit:
                return 0
            self.broker.stats.limited["subscriptions"] += 1
            code = ReasonCode.QUOTA_EXCEEDED if v5 else 0x80
        if self.version == MQTT_31:
            raise ProtocolError("subscription over a limit")  # 3.1 has no SUBACK failure code
        return int(code)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        session = self._connected_session()
        if self.version == MQTT_5:
            for full_filter in packet.topic_filters:
                _check_filter(full_filter, True)
        codes = []
        for full_filter in packet.topic_filters:
            removed = self.broker.unsubscribe(session, full_filter)
            codes.append(ReasonCode.SUCCESS if removed else ReasonCode.NO_SUBSCRIPTION_EXISTED)
        self.send_packet(
            UnsubAck(
                packet_id=packet.packet_id,
                reason_codes=tuple(codes) if self.version == MQTT_5 else (),
            )
        )

    # ---------------------------------------------------------------- endings

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self._connected_session()
        new_expiry = packet.properties.session_expiry_interval
        if new_expiry is not None:
            if session.expiry_interval == 0 and new_expiry != 0:
                raise ProtocolError(
                    "session expiry set on DISCONNECT after 0 on CONNECT"
                )  # MQTT-3.14.2-2
            session.expiry_interval = min(new_expiry, self.broker.settings.max_session_expiry)
        # MQTT-3.1.2-10: a normal DISCONNECT deletes the will; 5.0 reason 0x04 keeps it.
        self.will_on_close = packet.reason_code == ReasonCode.DISCONNECT_WITH_WILL
        self._end()

    def _connected_session(self) -> Session:
        if self.state != CONNECTED or self.session is None:
            raise ProtocolError("packet before CONNECT")
        return self.session

    def _protocol_error(self, error: ProtocolError) -> None:
        self.broker.stats.protocol_errors += 1
        if self.state == CONNECTING:
            if isinstance(error, UnsupportedProtocolVersion):
                # Answer in 3.1.1 form, which clients of every level can read (MQTT-3.1.2-2).
                self._write(b"\x20\x02\x00\x01")
            elif self.decoder.requested_level == MQTT_5:
                self.version = MQTT_5
                self.send_packet(ConnAck(reason_code=error.reason_code))
            self.will_on_close = False
        elif self.version == MQTT_5:
            props = EMPTY_PROPERTIES
            if self.problem_info:
                props = Properties(reason_string=str(error)[:200])
            self.send_packet(Disconnect(reason_code=error.reason_code, properties=props))
        self._end()

    def disconnect(self, reason: ReasonCode, *, publish_will: bool) -> None:
        """Server-initiated close: DISCONNECT with `reason` for 5.0 clients, then close."""
        if self.state == CLOSED:
            return
        if self.state == CONNECTED and self.version == MQTT_5:
            self.send_packet(Disconnect(reason_code=reason))
        self.will_on_close = publish_will
        self._end()

    def connection_lost(self, now: float) -> None:
        """The shell reports the socket closed (by us or by the peer)."""
        self._end(now)

    def _end(self, now: float | None = None) -> None:
        if self.state == CLOSED:
            return
        was_connected = self.state == CONNECTED
        self.state = CLOSED
        self.link.close()
        if was_connected:
            self.broker.detach(self, self.broker.clock() if now is None else now)
        else:
            self.broker.forget(self)


def _check_filter(full_filter: str, v5: bool) -> None:
    """Raise for a topic filter that breaks the syntax rules (5.0: a Malformed Packet, 0x81).

    An empty filter (MQTT-4.7.3-1), '#' not alone or not last (MQTT-4.7.1-1; 3.1.1: -2), '+'
    not a whole level (MQTT-4.7.1-2; 3.1.1: -3), a bad share name (MQTT-4.8.2-1, -2). 5.0
    keeps SUBACK 0x8F for a well-formed filter the server does not allow; 3.1 has no SUBACK
    failure code at all, so there the connection closes too.
    """
    try:
        _, inner = split_shared(full_filter)
    except ValueError:
        inner = ""
    if not is_valid_topic_filter(inner):
        message = f"invalid topic filter {full_filter!r}"
        raise MalformedPacket(message) if v5 else ProtocolError(message)
