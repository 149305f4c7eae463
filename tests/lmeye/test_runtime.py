"""The embedded local Ray: its workers find it by RAY_ADDRESS and its state API answers.

Ray Train's placement-group cleaner (an actor of every TorchTrainer) looks its cluster up this
way; without it each training stage stalled at its end (lmeye.runtime.init_ray).
"""

from __future__ import annotations


def test_workers_of_the_embedded_ray_find_it_and_its_state_api(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def lookup() -> tuple[str, str, int]:
        import os

        from ray.util.state import list_actors

        return os.environ.get("RAY_ADDRESS", ""), ray.get_runtime_context().gcs_address, len(list_actors(timeout=30))

    address, gcs, _ = ray.get(lookup.remote(), timeout=120)
    assert address == gcs  # the address of this Ray, not of one `ray start` left behind
