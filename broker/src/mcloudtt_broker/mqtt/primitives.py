"""Wire primitives (MQTT 5.0 section 1.5): integers, UTF-8 strings, binary data, varints.

Decoders take a buffer, an offset and the end of the current packet, and return the value and the
next offset; running past `end` raises `IncompletePacket`, which the packet decoder turns into
"malformed" once it knows the whole packet is present.
"""

from __future__ import annotations

from .errors import IncompletePacket, MalformedPacket

MAX_VARINT = 268_435_455


def decode_varint(data: memoryview | bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= end:
            raise IncompletePacket
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    # MQTT-1.5.5-1: at most four bytes.
    raise MalformedPacket("variable byte integer longer than four bytes")


def encode_varint(value: int, out: bytearray) -> None:
    if value < 128:
        out.append(value)
        return
    if value > MAX_VARINT:
        raise ValueError(f"{value} does not fit a variable byte integer")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def varint_size(value: int) -> int:
    if value < 128:
        return 1
    if value < 16_384:
        return 2
    if value < 2_097_152:
        return 3
    return 4


def decode_u16(data: memoryview | bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise IncompletePacket
    return (data[pos] << 8) | data[pos + 1], pos + 2


def decode_binary(data: memoryview | bytes | bytearray, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise IncompletePacket
    length = (data[pos] << 8) | data[pos + 1]
    pos += 2
    stop = pos + length
    if stop > end:
        raise IncompletePacket
    return bytes(data[pos:stop]), stop


def decode_string(data: memoryview | bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    if pos + 2 > end:
        raise IncompletePacket
    length = (data[pos] << 8) | data[pos + 1]
    pos += 2
    stop = pos + length
    if stop > end:
        raise IncompletePacket
    try:
        # MQTT-1.5.4-1: well-formed UTF-8, no surrogates (the strict codec rejects them).
        text = str(data[pos:stop], "utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("string is not valid UTF-8") from None
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000")  # MQTT-1.5.4-2
    return text, stop


def encode_string(text: str, out: bytearray) -> None:
    raw = text.encode()
    if len(raw) > 65_535:
        raise ValueError("string longer than 65,535 bytes")
    out += len(raw).to_bytes(2, "big")
    out += raw


def encode_binary(raw: bytes, out: bytearray) -> None:
    if len(raw) > 65_535:
        raise ValueError("binary data longer than 65,535 bytes")
    out += len(raw).to_bytes(2, "big")
    out += raw
