"""Dockerfiles and deployment scripts, checked without a Docker daemon: multi-stage, a slim base
given as a build argument, a non-root user, only the member each image deploys (and its locked
dependencies, from a wheelhouse), no secrets in the build context; hadolint and shellcheck
clean. tests/containers builds and runs the images."""

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
    # The base is a build argument (kind/base-image.sh's local image where no registry is
    # reachable), the official slim Python image by default, the same in every stage.
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.11-slim(-bookworm)?", base.group(1)), base
    assert text.index("ARG BASE_IMAGE=") < text.index("\nFROM ")
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 2, "multi-stage"
    assert {image for image, _ in stages} == {"${BASE_IMAGE}"}
    final = text[text.rindex("\nFROM ") :]
    user = re.search(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert user and user.group(1).split(":")[0] not in ("root", "0"), "non-root user"
    # Only this member's wheelhouse comes in, and pip installs from it with no index: exactly
    # the hashed pins of requirements.txt, then the members' own wheels without dependencies.
    copied = re.findall(r"^COPY\s+(?!--from)(\S+)", text, re.MULTILINE)
    assert copied == [f"build/wheelhouse/{member}/"], copied
    installs = re.findall(r"pip install ([^&]*)", text.replace("\\\n", " "))
    assert len(installs) == 2 and all("--no-index" in i for i in installs), installs
    assert "--require-hashes -r /wheelhouse/requirements.txt" in " ".join(installs[0].split())
    own = set(re.findall(r"/wheelhouse/mcloudtt_(\w+)-\*\.whl", installs[1]))
    assert "--no-deps" in installs[1] and own == IMAGES[member], own
    # The final stage takes the virtualenv from the builder, no wheelhouse, no source tree.
    assert re.search(r"^COPY --from=builder /opt/venv /opt/venv$", final, re.MULTILINE)
    assert not re.search(r"^(ADD|COPY)\s+(?!--from)", final, re.MULTILINE)
    assert not re.search(r"(?i)(password|secret|credentials|token)\s*=", text)


def test_images_script_exports_the_lock_per_member() -> None:
    # The wheelhouse holds what uv.lock pins for that member alone, without dev dependencies.
    script = (ROOT / "kind" / "images.sh").read_text()
    assert 'export --frozen --no-dev --package "mcloudtt-$component" --no-emit-workspace' in script
    assert "--require-hashes" in script and "--network none" in script
    # kind/up.sh builds through the same script as CI (.ci/containers).
    for user in ("kind/up.sh", ".ci/containers"):
        assert "kind/images.sh" in (ROOT / user).read_text(), user


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "ignore everything, then allow what the builds need"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    assert allowed == {"build/wheelhouse/"}


def test_lock_matches_the_workspace() -> None:
    # The wheelhouse is `uv export --frozen`: a stale uv.lock would put the wrong pins in it.
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
        ROOT / ".ci" / "containers",
        ROOT / "kind" / "images.sh",
        ROOT / "kind" / "base-image.sh",
    ]
    proc = subprocess.run(
        [str(tools.shellcheck), *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
