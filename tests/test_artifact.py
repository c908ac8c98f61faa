import json

import pyarrow as pa
import pytest

from storage import Artifact, ArtifactError, ArtifactWriter, ShardedWriter, identity, is_finished


def _rows(n, start=0):
    return [{"id": f"r{i}", "x": i} for i in range(start, start + n)]


@pytest.mark.parametrize("base", ["local", "memory"])
def test_roundtrip_shards_and_manifest(tmp_path, base):
    uri = str(tmp_path / "a") if base == "local" else "memory://fermine-test/a"
    with ArtifactWriter(uri, stage="unit", config={"k": 1}, inputs={"src": "abc"}, rows_per_shard=4) as w:
        w.write_rows(_rows(10))
    art = Artifact(uri)
    assert len(art) == 10
    assert [s.rows for s in art.manifest.shards] == [4, 4, 2]
    assert art.manifest.stage == "unit" and art.manifest.config == {"k": 1} and art.manifest.inputs == {"src": "abc"}
    assert art.read().column("x").to_pylist() == list(range(10))
    streamed = [r for b in art.iter_batches(batch_size=3) for r in b.column("id").to_pylist()]
    assert streamed == [f"r{i}" for i in range(10)]


def test_unfinished_artifact_is_refused(tmp_path):
    uri = str(tmp_path / "a")
    w = ArtifactWriter(uri, stage="unit", rows_per_shard=2)
    w.write_rows(_rows(5))  # two shards flushed, no manifest
    assert not is_finished(uri)
    with pytest.raises(ArtifactError, match="no manifest"):
        Artifact(uri)


def test_crash_inside_writer_leaves_no_manifest(tmp_path):
    uri = str(tmp_path / "a")
    with pytest.raises(RuntimeError):
        with ArtifactWriter(uri, stage="unit", rows_per_shard=2) as w:
            w.write_rows(_rows(5))
            raise RuntimeError("killed")
    with pytest.raises(ArtifactError):
        Artifact(uri)


def test_corrupt_shard_named_in_error(tmp_path):
    uri = str(tmp_path / "a")
    with ArtifactWriter(uri, stage="unit", rows_per_shard=2) as w:
        w.write_rows(_rows(4))
    p = tmp_path / "a" / "part-00001.parquet"
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    art = Artifact(uri)
    art.read_shard(0)
    with pytest.raises(ArtifactError, match="part-00001.parquet"):
        art.read_shard(1)


def test_missing_artifact_message(tmp_path):
    with pytest.raises(ArtifactError, match="no artifact"):
        Artifact(str(tmp_path / "nope"))


def test_sharded_writer_resumes_only_unfinished(tmp_path):
    uri = str(tmp_path / "s")
    w = ShardedWriter(uri)
    w.write_shard("part-00000.parquet", pa.Table.from_pylist(_rows(3)))
    # a torn marker and a stray temp file from a crash
    (tmp_path / "s" / "part-00001.parquet.json").write_text("{")
    (tmp_path / "s" / "_tmp-dead").write_bytes(b"xx")
    w2 = ShardedWriter(uri)
    assert set(w2.done()) == {"part-00000.parquet"}
    w2.write_shard("part-00001.parquet", pa.Table.from_pylist(_rows(2, 3)))
    m = w2.commit("unit", {}, order=["part-00000.parquet", "part-00001.parquet"])
    assert m.rows == 5
    assert not list((tmp_path / "s").glob("_tmp-*"))
    with pytest.raises(ArtifactError, match="already a finished artifact"):
        ShardedWriter(uri)


def test_commit_refuses_missing_shards(tmp_path):
    w = ShardedWriter(str(tmp_path / "s"))
    w.write_shard("part-00000.parquet", pa.Table.from_pylist(_rows(1)))
    with pytest.raises(ArtifactError, match="not written"):
        w.commit("unit", {}, order=["part-00000.parquet", "part-00001.parquet"])


def test_digest_and_identity_are_stable(tmp_path):
    for name in ("a", "b"):
        with ArtifactWriter(str(tmp_path / name), stage="unit", rows_per_shard=3) as w:
            w.write_rows(_rows(7))
    assert Artifact(str(tmp_path / "a")).digest == Artifact(str(tmp_path / "b")).digest
    i1 = identity("train", {"lr": 0.01}, {"data": "d1"}, "v1")
    assert i1 == identity("train", {"lr": 0.01}, {"data": "d1"}, "v1")
    assert i1 != identity("train", {"lr": 0.02}, {"data": "d1"}, "v1")
    assert i1 != identity("train", {"lr": 0.01}, {"data": "d2"}, "v1")


def test_manifest_is_json_with_checksums(tmp_path):
    uri = str(tmp_path / "a")
    with ArtifactWriter(uri, stage="unit", rows_per_shard=3) as w:
        w.write_rows(_rows(4))
    m = json.loads((tmp_path / "a" / "_manifest.json").read_text())
    assert m["rows"] == 4 and m["schema_version"] == 1 and len(m["shards"]) == 2
    assert all(len(s["sha256"]) == 64 for s in m["shards"])


def test_clear_unfinished_removes_our_leftovers_and_refuses_anything_else(tmp_path):
    from storage.artifact import clear_unfinished

    uri = str(tmp_path / "a")
    w = ArtifactWriter(uri, stage="unit", rows_per_shard=2)
    w.write_rows(_rows(5))  # an interrupted write: shards and markers, no manifest
    (tmp_path / "a" / "rejects").mkdir()
    (tmp_path / "a" / "rejects" / "part-00000.parquet").write_bytes(b"x")
    clear_unfinished(uri, subfolders=("rejects",))
    assert not (tmp_path / "a").exists()

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "me.jpg").write_bytes(b"precious")
    with pytest.raises(ArtifactError, match=r"not an unfinished artifact's \(me.jpg\)"):
        clear_unfinished(str(photos))
    assert (photos / "me.jpg").read_bytes() == b"precious"
    (photos / "me.jpg").unlink()
    (photos / "rejects").mkdir()
    (photos / "rejects" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="rejects/notes.txt"):
        clear_unfinished(str(photos), subfolders=("rejects",))
    clear_unfinished(str(tmp_path / "nothing-here"))  # nothing to clear is fine


def test_ingest_never_empties_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    from flows.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["ingest", "synthetic", "0", str(photos), "-o", "train_per_class=1", "-o", "test_per_class=0",
              "-o", "pool_size=0", "-o", "size=16"])
    assert e.value.code == 2 and "refusing to clear it" in capsys.readouterr().err
    assert (photos / "holiday.txt").read_text() == "keep me"
