from __future__ import annotations

import pytest
from mcloudtt_broker.config import ConfigError, redact_url, resolve


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rediss://:s3cret@10.0.0.3:6378/0", "rediss://:***@10.0.0.3:6378/0"),
        ("redis://user:pw@host/1", "redis://user:***@host/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_passwords_never_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_environment_then_file_then_default(tmp_path) -> None:
    config = tmp_path / "b.toml"
    config.write_text('max_keepalive = 30\nbind = ["0.0.0.0:1884"]\n')
    values = resolve({"max-keepalive": None}, {"MCLOUDTT_MAX_KEEPALIVE": "60"}, str(config))
    assert values["max-keepalive"] == 60  # the environment wins over the file
    assert values["bind"] == [("0.0.0.0", 1884)]
    assert values["max-queued-messages"] == 1000


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"redis": "http://x"}, "redis:// or rediss://"),
        ({"cluster-mode": "mesh"}, "routed, broadcast"),
        ({"bind": ["nohost"]}, "HOST:PORT"),
    ],
)
def test_bad_values_say_what_is_wrong(cli: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(cli, {}, None)
