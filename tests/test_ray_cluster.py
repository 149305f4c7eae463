"""`ray_cluster.yaml` is a config `ray up` accepts: Ray's own schema plus LingCloud's invariants."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_valid_against_the_schema_shipped_with_ray(cluster):
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_what_ray_up_itself_checks(cluster):
    # What `ray up` does before it touches a cloud: fill in the defaults, then validate
    # (schema, node types, head type, worker bounds).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def _types_with(cluster: dict, resource: str) -> dict[str, dict]:
    return {n: t for n, t in cluster["available_node_types"].items() if t["resources"].get(resource, 0) > 0}


def test_node_types_for_every_stage(cluster):
    types = cluster["available_node_types"]
    roles = {t.get("labels", {}).get("lingcloud-role"): n for n, t in types.items()}
    assert {"head", "download", "extract", "train"} <= set(roles)
    assert cluster["head_node_type"] == roles["head"]
    gpu = _types_with(cluster, "GPU")
    assert roles["extract"] in gpu and roles["train"] in gpu  # both GPU stages can be scheduled
    assert roles["download"] not in gpu  # downloads must not hold GPU nodes
    assert types[roles["head"]]["resources"].get("GPU", 0) == 0


def test_autoscaling_bounds(cluster):
    workers = {n: t for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"]}
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["max_workers"] <= cluster["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= cluster["max_workers"]


def test_every_node_installs_the_project_with_its_environment(cluster):
    mounts = cluster["file_mounts"]
    project = next(remote for remote, local in mounts.items() if local == ".")
    setup = " ".join(cluster["setup_commands"])
    assert f"pip install -q -e {project}" in setup
    assert "NO_ALBUMENTATIONS_UPDATE=1" in setup
    # no node type replaces the shared setup with its own (that would skip the install)
    assert not any("worker_setup_commands" in t for t in cluster["available_node_types"].values())
    # token auth stays on: the token is shipped to every node and every `ray start` asks for it
    assert any(local.endswith(".ray/auth_token") for local in mounts.values())
    for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd and "NO_ALBUMENTATIONS_UPDATE=1" in cmd
    assert "disabled" not in json.dumps(cluster)

