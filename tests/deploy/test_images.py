"""Dockerfiles and deployment scripts, checked without a Docker daemon: multi-stage, a slim base,
a non-root user, only the member each image deploys (and its dependencies), no secrets in the
build context; hadolint and shellcheck clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .manifests import ROOT, Tools

pytestmark = pytest.mark.timeout(900)

IMAGES = {
    # member -> workspace members whose source the image may contain
    "broker": {"broker"},
    "adapter": {"adapter", "broker"},  # the adapter imports the broker's codec
    "simulator": {"simulator", "mqttclient"},  # its MQTT packets come from the client codec
}


@pytest.mark.parametrize("member", sorted(IMAGES))
def test_dockerfile_builds_one_member(member: str) -> None:
    text = (ROOT / member / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 2, "multi-stage"
    for image, _ in stages:
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", image), image
    final = text[text.rindex("\nFROM ") :]
    user = re.search(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert user and user.group(1).split(":")[0] not in ("root", "0"), "non-root user"
    assert f"--package mcloudtt-{member}" in text and "--no-dev" in text
    assert "--locked" in text, "install exactly what uv.lock says"
    # Only this member's source (and what it imports) is copied in.
    copied = set(re.findall(r"^COPY\s+(?!--from)(\w+)/src\b", text, re.MULTILINE))
    assert copied == IMAGES[member], copied
    # Dependencies are installed from the manifests alone (every member's pyproject.toml, found
    # by the manifests stage, so a new workspace member needs no change here).
    assert "COPY --from=manifests /manifests/ ./" in text
    # The final stage takes the virtualenv from the builder, no source tree.
    assert re.search(r"^COPY --from=builder /opt/venv /opt/venv$", final, re.MULTILINE)
    assert not re.search(r"^(ADD|COPY)\s+(?!--from)", final, re.MULTILINE)
    assert not re.search(r"(?i)(password|secret|credentials|token)\s*=", text)


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "ignore everything, then allow what the builds need"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "uv.lock", "*/pyproject.toml", "*/README.md", "*/src/"}


def test_lock_matches_the_workspace() -> None:
    # The images install with `uv sync --locked`: a stale uv.lock fails every image build.
    uv = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    if not Path(uv).exists():
        pytest.skip("uv is not installed")
    proc = subprocess.run(
        [uv, "lock", "--check", "--offline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint(tools: Tools) -> None:
    files = [str(ROOT / member / "Dockerfile") for member in sorted(IMAGES)]
    proc = subprocess.run(
        [str(tools.hadolint), *files], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck(tools: Tools) -> None:
    scripts = [
        ROOT / "kind" / "up.sh",
        ROOT / "kind" / "down.sh",
        ROOT / "kind" / "overlays" / "gke" / "configure.sh",
        ROOT / ".ci" / "validate-deploy",
    ]
    proc = subprocess.run(
        [str(tools.shellcheck), *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
