"""Sans-IO MQTT 3.1.1 and 5.0: codec, packets, properties, reason codes and topic rules.

Nothing in this package does I/O or imports asyncio, sockets or redis.
"""

from .codec import (
    MQTT_5,
    MQTT_31,
    MQTT_311,
    Decoder,
    UnsupportedProtocolVersion,
    encode,
    encode_bytes,
)
from .errors import MalformedPacket, MQTTError, PacketTooLarge, ProtocolError
from .packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    SubscriptionRequest,
    UnsubAck,
    Unsubscribe,
    Will,
)
from .properties import EMPTY_PROPERTIES, Properties
from .reason_codes import ReasonCode

__all__ = [
    "EMPTY_PROPERTIES",
    "MQTT_5",
    "MQTT_31",
    "MQTT_311",
    "Auth",
    "ConnAck",
    "Connect",
    "Decoder",
    "Disconnect",
    "MQTTError",
    "MalformedPacket",
    "Packet",
    "PacketTooLarge",
    "PingReq",
    "PingResp",
    "Properties",
    "ProtocolError",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "ReasonCode",
    "SubAck",
    "Subscribe",
    "SubscriptionRequest",
    "UnsubAck",
    "Unsubscribe",
    "UnsupportedProtocolVersion",
    "Will",
    "encode",
    "encode_bytes",
]
