import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage import Artifact, ArtifactWriter, ShardedWriter
from workers.sharded import PoolConfig, run_sharded


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
    # A previous attempt finished shard 1 only, with a sentinel value we can recognise.
    ShardedWriter(out).write_shard("part-00001.parquet", pa.table({"id": ["sentinel"], "x": [99], "y": [0]}))
    seen = []
    run_sharded(src, out, _double_factory, stage="double", config={}, with_rejects=False,
                on_shard=lambda i, info, r: seen.append(i))
    assert sorted(seen) == [0, 2, 3]
    ids = Artifact(out).read()["id"].to_pylist()
    assert "sentinel" in ids and len(ids) == len(set(ids))


def _failing_factory():
    def fn(table):
        raise ValueError("boom")

    return fn


def test_run_sharded_reports_persistent_failure(tmp_path, ray_local):
    src = _src(tmp_path, 3)
    with pytest.raises(RuntimeError, match="failed"):
        run_sharded(src, str(tmp_path / "o"), _failing_factory, stage="f", config={}, pool=PoolConfig(max_retries=1))
