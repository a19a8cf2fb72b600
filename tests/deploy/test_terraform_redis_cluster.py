"""terraform/ with Memorystore for Redis Cluster as an option beside the single instance
(issue 15): one of the two by `redis_backend`, shards and replicas as variables with the bounds
the service takes, the instance kept where it was, TLS and noeviction either way, and outputs
(what configure.sh reads) that follow the choice. Checked on the parsed HCL, as test_terraform."""

from __future__ import annotations

from typing import Any

import pytest

from .manifests import TERRAFORM, Tools

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def hcl(tools: Tools) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {}
    for body in tools.load_hcl(sorted(TERRAFORM.glob("*.tf"))).values():
        for key, blocks in body.items():
            merged.setdefault(key, []).extend(blocks)
    return merged


def _named(hcl: dict[str, list[Any]], section: str, kind: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for block in hcl.get(section, []):
        for name, body in (block.get(kind, {}) if kind else block).items():
            out[name] = body
    return out


def test_one_of_instance_or_cluster(hcl: dict[str, list[Any]]) -> None:
    variables = _named(hcl, "variable")
    assert variables["redis_backend"]["default"] == "instance"  # existing deployments unchanged
    instance = _named(hcl, "resource", "google_redis_instance")["cluster"]
    cluster = _named(hcl, "resource", "google_redis_cluster")["bus"]
    assert instance["count"] == "${local.redis_cluster ? 0 : 1}"
    assert cluster["count"] == "${local.redis_cluster ? 1 : 0}"
    assert _named(hcl, "locals")["redis_cluster"] == '${var.redis_backend == "cluster"}'
    # The instance keeps its state address when `count` appears (no destroy and re-create).
    (moved,) = hcl["moved"]
    assert moved == {
        "from": "${google_redis_instance.cluster}",
        "to": "${google_redis_instance.cluster[0]}",
    }


def test_the_cluster_takes_the_plans_variables(hcl: dict[str, list[Any]]) -> None:
    cluster = _named(hcl, "resource", "google_redis_cluster")["bus"]
    assert cluster["shard_count"] == "${var.redis_shard_count}"
    assert cluster["replica_count"] == "${var.redis_replica_count}"
    assert cluster["node_type"] == "${var.redis_node_type}"
    assert cluster["transit_encryption_mode"] == "TRANSIT_ENCRYPTION_MODE_SERVER_AUTHENTICATION"
    assert cluster["redis_configs"] == {"maxmemory-policy": "noeviction"}
    assert cluster["zone_distribution_config"][0]["mode"] == "MULTI_ZONE"
    assert cluster["persistence_config"][0]["mode"] == "RDB"
    assert cluster["psc_configs"][0]["network"] == "${google_compute_network.vpc.id}"
    assert cluster["deletion_protection_enabled"] == "${var.deletion_protection}"
    policy = _named(hcl, "resource", "google_network_connectivity_service_connection_policy")
    assert policy["redis"]["service_class"] == "gcp-memorystore-redis"
    assert policy["redis"]["psc_config"][0]["subnetworks"] == [
        "${google_compute_subnetwork.redis_psc[0].id}"
    ]
    variables = _named(hcl, "variable")
    assert variables["redis_shard_count"]["default"] == 3
    assert variables["redis_replica_count"]["default"] == 1
    for name in ("redis_backend", "redis_shard_count", "redis_replica_count", "redis_node_type"):
        assert variables[name]["validation"], name


def test_outputs_follow_the_choice(hcl: dict[str, list[Any]]) -> None:
    outputs = _named(hcl, "output")
    assert "discovery_endpoints[0].address" in outputs["redis_host"]["value"]
    assert "google_redis_instance.cluster[0].host" in outputs["redis_host"]["value"]
    assert "var.redis_cluster_psc_cidr" in outputs["redis_reserved_range"]["value"]
    assert outputs["redis_backend"]["value"] == "${var.redis_backend}"
    assert outputs["redis_auth_string"]["sensitive"] is True
    script = (TERRAFORM.parent / "kind" / "overlays" / "gke" / "configure.sh").read_text()
    for name in ("redis_backend", "redis_cluster_name", "redis_region"):
        assert f"tf {name}" in script and name in outputs, name


def test_example_tfvars_show_the_cluster_option() -> None:
    text = (TERRAFORM / "terraform.tfvars.example").read_text()
    for line in (
        'redis_backend             = "cluster"',
        "redis_shard_count",
        "redis_replica_count",
    ):
        assert line in text, line
