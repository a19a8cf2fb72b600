"""terraform/: formatted, parseable, and holding what production needs. `terraform init` and
`validate` need the google provider from the Terraform registry, which is not reachable here:
the structure is checked on the parsed HCL instead."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest

from .manifests import TERRAFORM, Tools

pytestmark = pytest.mark.timeout(900)


def test_terraform_fmt() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not installed (it is on no registry reachable here)")
    proc = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def hcl(tools: Tools) -> dict[str, list[Any]]:
    """Top-level blocks of all files, merged: {"resource": [...], "variable": [...], ...}."""
    merged: dict[str, list[Any]] = {}
    for body in tools.load_hcl(sorted(TERRAFORM.glob("*.tf"))).values():
        for key, blocks in body.items():
            merged.setdefault(key, []).extend(blocks)
    return merged


def _resources(hcl: dict[str, list[Any]], rtype: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for block in hcl.get("resource", []):
        for name, body in block.get(rtype, {}).items():
            out[name] = body
    return out


def _one(hcl: dict[str, list[Any]], rtype: str) -> dict[str, Any]:
    found = _resources(hcl, rtype)
    assert len(found) == 1, f"expected one {rtype}, found {sorted(found)}"
    return next(iter(found.values()))


def test_gke_autopilot_cluster(hcl: dict[str, list[Any]]) -> None:
    cluster = _one(hcl, "google_container_cluster")
    assert cluster["enable_autopilot"] is True
    assert cluster["private_cluster_config"][0]["enable_private_nodes"] is True
    assert cluster["release_channel"][0]["channel"] == "${var.release_channel}"
    policy = cluster["ip_allocation_policy"][0]
    subnet = _resources(hcl, "google_compute_subnetwork")["gke"]  # (redis_psc: the cluster option)
    ranges = {r["range_name"] for r in subnet["secondary_ip_range"]}
    assert {
        policy["cluster_secondary_range_name"],
        policy["services_secondary_range_name"],
    } == ranges
    assert cluster["network"] == "${google_compute_network.vpc.id}"
    assert subnet["private_ip_google_access"] is True
    defaults = cluster["cluster_autoscaling"][0]["auto_provisioning_defaults"][0]
    assert defaults["service_account"] == "${google_service_account.nodes.email}"


def test_memorystore_has_auth_tls_and_ha(hcl: dict[str, list[Any]]) -> None:
    redis = _one(hcl, "google_redis_instance")
    assert redis["tier"] == "STANDARD_HA"
    assert redis["auth_enabled"] is True
    assert redis["transit_encryption_mode"] == "SERVER_AUTHENTICATION"
    assert redis["connect_mode"] == "PRIVATE_SERVICE_ACCESS"
    assert redis["redis_configs"]["maxmemory-policy"] == "noeviction"


def test_bigquery_table_matches_the_adapter(hcl: dict[str, list[Any]]) -> None:
    table = _one(hcl, "google_bigquery_table")
    partitioning = table["time_partitioning"][0]
    assert (partitioning["type"], partitioning["field"]) == ("DAY", "event_time")
    assert table["clustering"] == ["device_id", "topic"]
    assert "mcloudtt_schema" in table["labels"]
    assert "schemas/messages.json" in table["schema"]

    schema_module = pytest.importorskip("mcloudtt_adapter.schema")
    schema = json.loads((TERRAFORM / "schemas" / "messages.json").read_text())
    expected = []
    for column in schema_module.COLUMNS:
        field: dict[str, Any] = {
            "name": column.name,
            "type": column.bigquery,
            "mode": column.mode,
            "description": column.description,
        }
        if column.name == "metrics":
            field["fields"] = [
                {"name": name, "type": bq, "mode": "NULLABLE"}
                for name, _, bq in schema_module.METRIC_FIELDS
            ]
        expected.append(field)
    assert schema == expected, (
        "terraform/schemas/messages.json differs from mcloudtt_adapter.schema"
    )
    label = re.search(r'mcloudtt_schema\s*=\s*"(\d+)"', (TERRAFORM / "bigquery.tf").read_text())
    assert label and int(label.group(1)) == schema_module.SCHEMA_VERSION


def test_adapter_identity_is_least_privilege_and_keyless(hcl: dict[str, list[Any]]) -> None:
    assert not _resources(hcl, "google_service_account_key"), "no key files"
    dataset_roles = {
        r["role"]: r for r in _resources(hcl, "google_bigquery_dataset_iam_member").values()
    }
    assert set(dataset_roles) == {"roles/bigquery.dataEditor"}
    assert "google_service_account.adapter" in dataset_roles["roles/bigquery.dataEditor"]["member"]
    project_roles = {
        (r["role"], r["member"]) for r in _resources(hcl, "google_project_iam_member").values()
    }
    adapter_project_roles = {role for role, member in project_roles if "adapter" in member}
    assert adapter_project_roles == {"roles/bigquery.jobUser"}
    wi = _one(hcl, "google_service_account_iam_member")
    assert wi["role"] == "roles/iam.workloadIdentityUser"
    assert wi["member"] == (
        "serviceAccount:${var.project_id}.svc.id.goog"
        "[${var.k8s_namespace}/${var.k8s_adapter_service_account}]"
    )
    variables = {name: body for block in hcl["variable"] for name, body in block.items()}
    assert variables["k8s_namespace"]["default"] == "mcloudtt"
    assert variables["k8s_adapter_service_account"]["default"] == "mcloudtt-adapter"


def test_no_hard_coded_project_and_remote_state(hcl: dict[str, list[Any]]) -> None:
    variables = {name: body for block in hcl["variable"] for name, body in block.items()}
    assert "default" not in variables["project_id"], "the project must be given"
    (terraform,) = hcl["terraform"]
    assert terraform["backend"] == [{"gcs": {}}], "GCS backend, configured with -backend-config"
    for path in TERRAFORM.glob("*.tf"):
        for line in path.read_text().splitlines():
            if re.match(r"\s*project\s*=", line):
                assert "var.project_id" in line, f"{path.name}: {line.strip()}"
    (registry,) = _resources(hcl, "google_artifact_registry_repository").values()
    assert registry["format"] == "DOCKER"
