import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage import Artifact, ArtifactWriter, ShardedWriter
from storage.artifact import claim
from workers.sharded import PoolConfig, ShardFailedError, run_sharded


def _double_factory():
    def fn(table: pa.Table):
        keep = pc.greater_equal(table["x"], 2)
        out = table.filter(keep).append_column("y", pc.multiply(table.filter(keep)["x"], 2))
        rej = pa.table({"id": table.filter(pc.invert(keep))["id"], "reason": pa.array(["small"] * (table.num_rows - out.num_rows), pa.string())})
        return out, rej

    return fn


def _src(tmp_path, n=10):
    uri = str(tmp_path / "src")
    with ArtifactWriter(uri, stage="unit", rows_per_shard=3) as w:
        w.write_rows([{"id": f"r{i}", "x": i} for i in range(n)])
    return uri


def test_run_sharded_all_rows_once_with_rejects(tmp_path, ray_local):
    src = _src(tmp_path)
    out = str(tmp_path / "out")
    m = run_sharded(src, out, _double_factory, stage="double", config={}, pool=PoolConfig(num_actors=2), with_rejects=True)
    t = Artifact(out).read()
    assert sorted(t["x"].to_pylist()) == list(range(2, 10))
    assert t["y"].to_pylist() == [2 * x for x in t["x"].to_pylist()]
    assert m.extra["rejects"] == 2
    assert sorted(Artifact(out + "/rejects").read()["id"].to_pylist()) == ["r0", "r1"]


def test_run_sharded_resumes_without_redoing(tmp_path, ray_local):
    src = _src(tmp_path)
    out = str(tmp_path / "out")
    # A previous attempt (same stage and settings) finished shard 1 only, with a sentinel value.
    claim(out, {"stage": "double", "config": {"k": 2}, "inputs": {}})
    ShardedWriter(out).write_shard("part-00001.parquet", pa.table({"id": ["sentinel"], "x": [99], "y": [0]}))
    with pytest.raises(FileExistsError, match="unfinished run with other inputs or settings"):
        run_sharded(src, out, _double_factory, stage="double", config={"k": 3}, with_rejects=False)
    seen = []
    m = run_sharded(src, out, _double_factory, stage="double", config={"k": 2}, with_rejects=False,
                    on_shard=lambda i, info, r: seen.append(i))
    assert sorted(seen) == [0, 2, 3]
    ids = Artifact(out).read()["id"].to_pylist()
    assert "sentinel" in ids and len(ids) == len(set(ids))
    # Finished: the same computation gets the artifact back untouched, another one is refused.
    assert run_sharded(src, out, _double_factory, stage="double", config={"k": 2}).digest == m.digest
    with pytest.raises(FileExistsError, match="finished artifact made from other inputs or settings"):
        run_sharded(src, out, _double_factory, stage="double", config={"k": 3})
    foreign = str(tmp_path / "foreign")  # shards nobody claimed: not ours to resume
    ShardedWriter(foreign).write_shard("part-00000.parquet", pa.table({"id": ["x"], "x": [1], "y": [0]}))
    with pytest.raises(FileExistsError, match="shards not written by this stage"):
        run_sharded(src, foreign, _double_factory, stage="double", config={"k": 2})


def _failing_factory():
    def fn(table):
        raise ValueError("boom")

    return fn


def test_run_sharded_reports_persistent_failure(tmp_path, ray_local):
    src = _src(tmp_path, 3)
    with pytest.raises(ShardFailedError, match="shard 0 of .* failed 2 times"):
        run_sharded(src, str(tmp_path / "o"), _failing_factory, stage="f", config={}, pool=PoolConfig(max_retries=1))


def test_unreachable_cluster_is_one_clear_error_not_a_hang(tmp_path):
    """`--ray-address` nobody answers on: one line that says what to check, exit 1, in seconds.

    In a fresh process: this one may already be connected to the tests' local instance.
    """
    import subprocess
    import sys
    import time

    from storage.ingest import write_image_table
    from storage.readers import get_reader

    table = str(tmp_path / "t")
    write_image_table(get_reader("synthetic")("0", size=16, train_per_class=1, test_per_class=0, pool_size=0),
                      table, stage="ingest.synthetic", config={})
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "flows.cli", "align", table, str(tmp_path / "o"),
                          "--ray-address", "127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "could not connect to the Ray cluster at '127.0.0.1:9'" in res.stderr and "ray status" in res.stderr
    assert time.monotonic() - t0 < 60
