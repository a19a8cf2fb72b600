"""The docker backend without a daemon: `--dry-run` shows the docker commands each fault runs,
and what it cannot do it refuses in one line (the backend itself runs in tests/containers)."""

from __future__ import annotations

import pytest
from mcloudtt_chaos import cli
from mcloudtt_chaos.backend import LinkFault
from mcloudtt_chaos.backends import load
from mcloudtt_chaos.backends.docker import DockerBackend


def test_dry_run_shows_the_docker_commands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "240")
    argv = ["run", "broker-kill", "partition", "rolling-restart", "redis-data-loss"]
    assert cli.main([*argv, "--backend", "docker", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # broker-kill: docker kill, which the restart policy leaves alone; then docker start.
    assert "docker kill --signal KILL mcdk-ID-b2" in out
    assert "docker start mcdk-ID-b2" in out
    # partition: off the backplane (cut from Redis), off the clients network, and back.
    assert "docker network disconnect mcdk-ID-backplane mcdk-ID-b1" in out
    assert "docker network connect --ip B1_ADDRESS mcdk-ID-backplane mcdk-ID-b1" in out
    assert "docker network disconnect mcdk-ID-clients mcdk-ID-b2" in out
    assert "docker network connect --ip B2_ADDRESS mcdk-ID-clients mcdk-ID-b2" in out
    assert out.count("docker stop --time 30 ") == 3  # rolling-restart: SIGTERM, each in turn
    assert "rm -rf WORKDIR/redis/*" in out  # redis-data-loss: back empty


def test_degrade_is_refused_in_one_clear_line() -> None:
    backend = load("docker")  # creating one needs no daemon
    assert isinstance(backend, DockerBackend)
    with pytest.raises(NotImplementedError, match="--backend local or --backend netns"):
        backend.degrade_redis_link("b0", LinkFault(latency_ms=50))
