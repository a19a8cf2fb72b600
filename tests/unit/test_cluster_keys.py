"""The cluster key's tags (sans-IO): bound to key and context, two keys during a rotation."""

from __future__ import annotations

import pytest
from mcloudtt_broker.cluster.keys import (
    ClusterKeys,
    KeyFileError,
    read_key_file,
    strip_unverified,
)

OLD, NEW = b"o" * 32, b"n" * 32


def test_tag_verifies_under_its_key_and_context_only() -> None:
    keys = ClusterKeys([OLD])
    tag = keys.tag(b"mcloudtt:inbox:b1", b"batch")
    assert len(tag) == 32
    assert keys.valid(b"mcloudtt:inbox:b1", b"batch", tag)
    assert not keys.valid(b"mcloudtt:inbox:b2", b"batch", tag)  # copied to another inbox
    assert not keys.valid(b"mcloudtt:inbox:b1", b"batcH", tag)
    assert not ClusterKeys([NEW]).valid(b"mcloudtt:inbox:b1", b"batch", tag)
    assert not keys.valid(b"mcloudtt:inbox:b1", b"batch", None)
    assert not keys.valid(b"mcloudtt:inbox:b1", b"batch", tag[:31])


def test_rotation_signs_with_the_first_and_accepts_either() -> None:
    rotating = ClusterKeys([NEW, OLD])
    assert rotating.valid(b"c", b"d", ClusterKeys([OLD]).tag(b"c", b"d"))
    assert rotating.valid(b"c", b"d", ClusterKeys([NEW]).tag(b"c", b"d"))
    assert rotating.tag(b"c", b"d") == ClusterKeys([NEW]).tag(b"c", b"d")


def test_framed_envelope_and_control_message() -> None:
    keys = ClusterKeys([OLD])
    signed = keys.sign_envelope(b"sync", b"\x01envelope")
    assert signed[0] == 2 and len(signed) == 1 + 32 + len(b"\x01envelope")
    assert keys.open_envelope(b"sync", signed) == b"\x01envelope"
    assert keys.open_envelope(b"other", signed) is None
    assert keys.open_envelope(b"sync", b"\x01envelope") is None  # unsigned (version 1)
    assert strip_unverified(signed) == b"\x01envelope"
    assert strip_unverified(b"\x01envelope") == b"\x01envelope"
    control = keys.sign_text(b"mcloudtt:control", "add\x00b1\x00t/#")
    assert keys.open_text(b"mcloudtt:control", control) == b"add\x00b1\x00t/#"
    assert keys.open_text(b"mcloudtt:control", b"add\x00b1\x00t/#") is None


def test_key_file(tmp_path) -> None:
    path = tmp_path / "key"
    path.write_bytes(NEW + b"\n" + OLD + b"\n\n")
    assert read_key_file(str(path)) == (NEW, OLD)
    for content, error in (
        (b"", "holds no key"),
        (b"short\n", "shorter than 16"),
        (NEW + b"\n" + OLD + b"\n" + NEW, "at most two"),
    ):
        path.write_bytes(content)
        with pytest.raises(KeyFileError, match=error):
            read_key_file(str(path))
    with pytest.raises(KeyFileError, match="cannot read"):
        read_key_file(str(tmp_path / "missing"))
