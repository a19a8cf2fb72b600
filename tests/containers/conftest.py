"""Fixtures for the container tests: a usable docker daemon (else ONE skip that says why, or a
failure where .ci/containers set one up), the images built by kind/images.sh, a Redis image,
and a network of containers removed at the end."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcloudtt_chaos.containers import Docker, Fleet, build_redis_image, unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
TAG = "dev"  # kind/base/kustomization.yaml pins the images to :dev


def require_docker() -> None:
    """Called at the top of every test module here: where containers cannot run, the module is
    skipped with the reason (one summary line for all of them)."""
    # .ci/containers says why docker cannot run on this machine (not root, no kernel support).
    skipped = os.environ.get("MCLOUDTT_CONTAINERS_SKIP")
    if skipped:
        pytest.skip(f"containers: {skipped}", allow_module_level=True)
    reason = unavailable_reason()
    if reason is not None and not os.environ.get("MCLOUDTT_REQUIRE_DOCKER"):
        pytest.skip(f"containers: {reason}", allow_module_level=True)


@pytest.fixture(scope="session")
def docker() -> Docker:
    # Where .ci/containers started a daemon, one that does not answer fails every test here.
    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"containers: {reason} (MCLOUDTT_REQUIRE_DOCKER is set)", pytrace=False)
    return Docker()


def _build(component: str) -> str:
    """kind/images.sh, as CI and kind/up.sh run it (cached layers make a rebuild quick)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "kind" / "images.sh"), "--tag", TAG, component],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, f"kind/images.sh {component} failed:\n{proc.stderr[-3000:]}"
    return f"mcloudtt-{component}:{TAG}"


@pytest.fixture(scope="session")
def broker_image(docker: Docker) -> str:
    return _build("broker")


@pytest.fixture(scope="session")
def adapter_image(docker: Docker) -> str:
    return _build("adapter")


@pytest.fixture(scope="session")
def redis_image(docker: Docker, broker_image: str) -> str:
    # On the broker image: the one Debian bookworm image certain to be here, whichever base
    # it was built on (no registry is needed for Redis either).
    return build_redis_image(docker, broker_image)


@pytest.fixture
def fleet(docker: Docker) -> Iterator[Fleet]:
    with Fleet.open(docker, f"mct-{uuid.uuid4().hex[:8]}") as f:
        yield f
