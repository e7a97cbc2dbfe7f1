"""One device per pool process: ``batching_pool_devices`` / ``CELERY_BATCHED_POOL_DEVICES``,
checked with fake device lists (no GPU needed: only ``CUDA_VISIBLE_DEVICES`` is set)."""

from __future__ import annotations

import pytest

from .apps import devices

APP = "tests.apps.devices"


def _placements(queue: str, n: int = 8) -> dict[str, str]:
    results = [devices.where.apply_async((i,), queue=queue) for i in range(n)]
    seen = [r.get(timeout=30) for r in results]
    return dict(s.split(":") for s in seen)  # pid -> device


def test_each_pool_process_sees_its_own_device(queue, start_worker):
    start_worker(APP, queues=queue, concurrency=2, env={"CELERY_BATCHED_POOL_DEVICES": "7,9"})
    placements = _placements(queue)
    assert sorted(placements.values()) == ["7", "9"], placements  # two processes, one each


def test_the_worker_option_overrides_the_environment(queue, start_worker):
    """``--batching-pool-devices`` (per node in ``celery multi``: ``--batching-pool-devices:n1=1``)."""
    start_worker(APP, queues=queue, concurrency=2, env={"CELERY_BATCHED_POOL_DEVICES": "7,9"},
                 extra_args=("--batching-pool-devices", "4,6"))
    assert sorted(_placements(queue).values()) == ["4", "6"]


def test_processes_can_share_a_device(queue, start_worker):
    start_worker(APP, queues=queue, concurrency=2, env={"CELERY_BATCHED_POOL_DEVICES": "3, 3"})
    placements = _placements(queue)
    assert len(placements) == 2 and set(placements.values()) == {"3"}, placements


def test_unpinned_processes_keep_the_workers_devices(queue, start_worker):
    start_worker(APP, queues=queue, concurrency=2, env={"CUDA_VISIBLE_DEVICES": "5"})
    assert set(_placements(queue).values()) == {"5"}


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_refused_where_batches_share_one_process(queue, start_worker, pool):
    with pytest.raises(RuntimeError, match="worker exited with") as err:
        start_worker(APP, queues=queue, pool=pool, env={"CELERY_BATCHED_POOL_DEVICES": "0,1"})
    out = " ".join(str(err.value).split())
    assert "pins each prefork pool process to a device" in out
    assert "one worker per device with CUDA_VISIBLE_DEVICES" in out


def test_an_empty_device_id_is_refused():
    from celery_batched.errors import WorkerConfigurationError
    from celery_batched.pool.devices import configured

    app = devices.make_app("devices-bad", batching_pool_devices=["0", ""])
    with pytest.raises(WorkerConfigurationError, match=r"batching_pool_devices=\['0', ''\] names "
                                                       r"an empty device id"):
        configured(app)
    app = devices.make_app("devices-list", batching_pool_devices=[0, 1])
    assert configured(app) == ["0", "1"]



def test_celery_multi_recipe_gives_each_node_its_device():
    """The GPU guide's ``celery multi`` recipe: one node per GPU, each with its own devices."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "celery", "multi", "show", "gpu0", "gpu1", "-A", APP, "-Q", "gpu",
         "-c", "2", "--batching-pool-devices:gpu0=0,0", "--batching-pool-devices:gpu1=1,1"],
        capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if " worker " in line]
    assert len(lines) == 2
    assert "--batching-pool-devices=0,0" in lines[0] and "-n gpu0@" in lines[0]
    assert "--batching-pool-devices=1,1" in lines[1] and "-n gpu1@" in lines[1]
