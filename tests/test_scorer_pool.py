"""The scoring actors kept between evaluations (pipelines.scorer_pool), on the session's Ray."""

import shutil
import time

import numpy as np
import pytest
import ray
from ray.exceptions import RayActorError

from pipelines import scorer_pool
from pipelines.evaluate import evaluate
from pipelines.ingest import IngestConfig, ingest
from pipelines.sources import synthetic as synth
from tests.test_registry import save_checkpoint

QUIET = {"log_to_mlflow": False, "log": lambda m: None}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    raw = synth.write_voc(root / "raw", n_train=2, n_val=7, size=(37, 45))
    return ingest(IngestConfig(dataset="voc", root=raw, out=root / "out"),
                  log=lambda m: None).dataset_dir


def _ids(handles) -> set[str]:
    return {h._actor_id.hex() for h in handles}


def _kept_handles() -> list:
    with scorer_pool._LOCK:
        return [h for hs in scorer_pool._POOLS.values() for h in hs]


def _dead(handle) -> bool:
    try:
        ray.get(handle.__ray_ready__.remote(), timeout=30)
    except RayActorError:
        return True
    return False


def test_evaluations_keep_their_actors_and_each_loads_its_own_model(ray_local, data, tmp_path,
                                                                   monkeypatch):
    scorer_pool.release()
    ckpt = save_checkpoint(tmp_path / "ckpt", seed=0)
    monkeypatch.setattr("pipelines.evaluate.PROGRESS_EVERY_S", 0.0)  # a line per batch
    lines: list[str] = []
    first = evaluate(str(ckpt), data, "val", actors=2, batch_size=2, log_to_mlflow=False,
                     log=lines.append)
    progress = [ln for ln in lines if ln.startswith("evaluate [val]: ")]
    assert progress and all(" images scored (" in ln for ln in progress), lines
    assert progress[0].startswith("evaluate [val]: 2/7 images scored"), progress
    assert scorer_pool.kept() == 2
    actors = _ids(_kept_handles())
    # Idle, they hold no CPU: a training run that follows can have every CPU.
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)

    # Another checkpoint at the same path: the next call scores it, on the same actors.
    shutil.rmtree(ckpt)
    save_checkpoint(ckpt, seed=1)
    second = evaluate(str(ckpt), data, "val", actors=2, batch_size=2, **QUIET)
    assert _ids(_kept_handles()) == actors
    here = evaluate(str(ckpt), data, "val", batch_size=3, **QUIET)  # 7 rows: this process
    assert second.images == here.images == 7
    assert np.array_equal(second.hist, here.hist)
    assert not np.array_equal(first.hist, second.hist)


def test_a_call_has_its_pool_alone_and_a_failed_call_ends_it(ray_local):
    scorer_pool.release()
    with scorer_pool.borrowed(2, 1, False) as a:
        with scorer_pool.borrowed(2, 1, False) as b:
            assert not _ids(a) & _ids(b)  # a concurrent call gets actors of its own
        assert _ids(_kept_handles()) == _ids(b)
    # Both came back: the last one is kept, the other ended.
    assert _ids(_kept_handles()) == _ids(a)
    assert all(_dead(h) for h in b)
    # Another size: it is kept instead.
    with scorer_pool.borrowed(1, 1, False) as one:
        pass
    assert _ids(_kept_handles()) == _ids(one)
    assert all(_dead(h) for h in a)
    with scorer_pool.borrowed(2, 1, False) as b:  # a new pool of 2
        assert not _ids(b) & _ids(a)

    with pytest.raises(ZeroDivisionError):
        with scorer_pool.borrowed(2, 1, False) as c:
            assert _ids(c) == _ids(b)  # the kept pool, reused
            assert scorer_pool.kept() == 0  # lent out
            _ = 1 / 0
    assert scorer_pool.kept() == 0
    assert all(_dead(h) for h in c)


def test_a_gpu_pool_ends_with_its_call(ray_local):
    """GPU actors hold their GPU: never kept (no GPU here: the actor waits for one)."""
    from ray.util.state import get_actor

    scorer_pool.release()
    with scorer_pool.borrowed(1, 0, True) as handles:
        assert len(handles) == 1
        actor_id = handles[0]._actor_id.hex()
        deadline = time.monotonic() + 30
        # Its own Ray's address: another test session may run a Ray beside it (make test).
        address = ray.get_runtime_context().gcs_address
        while (state := get_actor(actor_id, address=address)) is None:  # it lags a little
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # A whole GPU and no CPU: it waits here, where Ray has no GPU.
        assert state.required_resources == {"GPU": 1.0}, state.required_resources
    assert scorer_pool.kept() == 0
    assert _dead(handles[0])


def test_an_evaluation_does_not_wait_for_a_run_that_holds_every_cpu(ray_local, data, tmp_path):
    """The actors and the shard reads reserve no CPU: with every CPU of the cluster held (a
    placement group, as a Ray Train worker group holds them), an evaluation still ends."""
    import threading

    from ray.util.placement_group import placement_group, remove_placement_group

    scorer_pool.release()
    ckpt = save_checkpoint(tmp_path / "ckpt", seed=0)
    here = evaluate(str(ckpt), data, "val", batch_size=3, **QUIET)  # 7 rows: this process
    pg = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(pg.ready(), timeout=60)
    got: dict = {}
    try:
        t = threading.Thread(daemon=True, target=lambda: got.update(r=evaluate(
            str(ckpt), data, "val", actors=2, batch_size=2, **QUIET)))
        t.start()
        t.join(60)
        assert not t.is_alive(), "the evaluation waited for CPUs that a training run holds"
    finally:
        remove_placement_group(pg)
    assert got["r"].images == 7 and np.array_equal(got["r"].hist, here.hist)


def test_shard_reads_come_back_in_order_a_few_at_a_time(ray_local, data):
    from pipelines.shards import read_manifest

    shard = read_manifest(data).shards("val")[0][0]
    refs = scorer_pool.read_blocks([shard] * 5, ["id"], ahead=2)
    tables = [ray.get(r) for r in refs]
    assert len(tables) == 5 and all(t.column("id").to_pylist() == tables[0].column("id")
                                    .to_pylist() for t in tables)
    assert tables[0].num_rows == 7
