"""Ingest in parts (storage.readers.Splittable, storage.ingest.write_part/commit_parts, workers.ingest):
the same rows and rejects as the one-process ingest, resumable part by part, refusing foreign folders."""

from __future__ import annotations

import csv
import os

import pyarrow as pa
import pytest
from test_readers import CORRUPT, FER_ROWS, jpg, pack_ir, png, put, write_record

from storage.artifact import Artifact, ArtifactError, ShardedWriter, shard_name
from storage.ingest import (
    begin_parts,
    commit_parts,
    rejects_uri,
    write_image_table,
    write_part,
)
from storage.readers import get_reader, get_splittable
from storage.readers.base import DatasetFormatError, Entries

IMAGE_COLS = ["id", "image", "label", "split", "source", "valence", "arousal", "landmarks"]


# ---------------------------------------------------------------- sources with random access


def write_pool_rec(root, n: int = 14) -> None:
    """An insightface RecordIO pool: header, n images (image 5 corrupt, image 9's index offset stale),
    identity records, and bad .idx lines at the top, among the images and among the identities."""
    os.makedirs(root, exist_ok=True)
    offsets = {}
    with open(os.path.join(root, "train.rec"), "wb") as f:
        offsets[0] = write_record(f, pack_ir(2, 0.0, 0, 0, [n + 1, n + 3]))
        for k in range(1, n + 1):
            offsets[k] = write_record(f, pack_ir(0, 0.0, k, 0, data=CORRUPT if k == 5 else jpg(k, 16)))
        for i in range(2):
            offsets[n + 1 + i] = write_record(f, pack_ir(2, 0.0, 0, 0, [1, 2]))
    offsets[9] += 2  # points into the middle of a record: that image is a reject
    lines = [f"{k}\t{o}\n" for k, o in sorted(offsets.items())]
    lines.insert(n + 2, "no tab here\n")  # among the identity records, after every image
    lines.insert(7, "7\n")  # among the images
    lines.insert(0, "x\t0\n")  # before the header
    with open(os.path.join(root, "train.idx"), "w") as f:
        f.writelines(lines)


def write_ms1m_folders(root) -> None:
    for ident in ("a", "b", "c"):
        for n in range(3):
            put(os.path.join(root, ident, f"{n}.jpg"), jpg(ord(ident) * 10 + n, 16))
    put(os.path.join(root, "b", "7.jpg"), CORRUPT)


def write_folder_tree(root) -> None:
    put(os.path.join(root, "train/angry/a.jpg"), jpg(0))
    put(os.path.join(root, "train/angry/a2.jpg"), jpg(10))
    put(os.path.join(root, "train/Happiness/b.png"), png(1))
    put(os.path.join(root, "train/Happiness/sub/c.jpg"), jpg(2))
    put(os.path.join(root, "train/surprised/bad.jpg"), CORRUPT)
    put(os.path.join(root, "train/surprised/ok.jpg"), jpg(5))
    put(os.path.join(root, "Validation/neutral/d.jpg"), jpg(3))
    put(os.path.join(root, "Validation/contempt/e.jpg"), jpg(4))
    put(os.path.join(root, "loose.jpg"), jpg(6))  # next to the split folders: a reject


def write_unlabeled_tree(root) -> None:
    for i, sub in enumerate(("x", "x/y", "z")):
        put(os.path.join(root, sub, f"{i}.jpg"), jpg(i))
    put(os.path.join(root, "z", "broken.png"), CORRUPT)


def write_fer_csv(root) -> str:
    """FER2013's rows (bad pixels, label and split among them), a short row, a blank line and a quoted
    field holding a line break (one csv row over two lines), with the csv module's CRLF endings."""
    path = os.path.join(root, "fer2013.csv")
    os.makedirs(root, exist_ok=True)
    rows = [[e, p, u] for e, u, p in FER_ROWS]
    rows.insert(3, ["1", FER_ROWS[0][2], "Train\ning"])
    rows.insert(5, ["2"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        w.writerows(rows[:6])
        f.write("\r\n")
        w.writerows(rows[6:])
    return path


SOURCES = {
    "ms1m-recordio": ("ms1m", write_pool_rec, {}),
    "ms1m-recordio-start-limit": ("ms1m", write_pool_rec, {"start": 3, "limit": 6}),
    "ms1m-folders": ("ms1m", write_ms1m_folders, {}),
    "ms1m-folders-start-limit": ("ms1m", write_ms1m_folders, {"start": 2, "limit": 5}),
    "folder": ("folder", write_folder_tree, {}),
    "folder-unlabeled": ("folder", write_unlabeled_tree, {"unlabeled": True, "source": "mine"}),
    "fer2013": ("fer2013", write_fer_csv, {}),
}


def key(rec):
    return ("reject", rec.id, rec.reason) if not isinstance(rec, dict) else ("row", rec["id"], rec["image"],
                                                                              rec["label"], rec["split"])


@pytest.mark.parametrize("name", SOURCES)
def test_slices_read_in_order_are_the_plain_reader(tmp_path, name):
    fmt, write, opts = SOURCES[name]
    root = str(tmp_path / "src")
    write(root)
    want = list(get_reader(fmt)(root, **opts))
    assert any(isinstance(r, dict) for r in want) and any(not isinstance(r, dict) for r in want)
    sp = get_splittable(fmt)
    entries = sp.entries(root, **opts)
    assert len(entries) == len(want)  # one record per entry
    for size in (1, 2, 3, 5, len(entries) + 1):
        got = [r for a in range(0, len(entries), size) for r in sp.read_entries(entries[a:a + size])]
        assert [key(r) for r in got] == [key(r) for r in want], size
    assert list(sp.read_entries(entries[3:3])) == []


def test_bad_index_lines_are_reported_once_where_the_reader_reports_them(tmp_path):
    write_pool_rec(str(tmp_path))
    sp = get_splittable("ms1m")
    ids = [getattr(r, "id", None) or r["id"] for r in sp.read_entries(sp.entries(str(tmp_path)))]
    assert [i for i in ids if "idx-line" in i] == ["ms1m/idx-line-1", "ms1m/idx-line-9", "ms1m/idx-line-19"]
    ids = [getattr(r, "id", None) or r["id"] for r in sp.read_entries(sp.entries(str(tmp_path), start=3, limit=6))]
    # Before start: reported; after the image that ends the limit: not reached.
    assert ids == ["ms1m/idx-line-1", "ms1m/4", "ms1m/5", "ms1m/6", "ms1m/idx-line-9", "ms1m/7", "ms1m/8", "ms1m/9"]


def test_sources_without_random_access_and_bad_layouts(tmp_path):
    write_pool_rec(str(tmp_path / "rec"))
    os.remove(tmp_path / "rec" / "train.idx")
    assert get_splittable("ms1m").entries(str(tmp_path / "rec")) is None  # records only found in sequence
    assert get_splittable("rafdb") is None
    put(str(tmp_path / "odd/smiling/a.jpg"), jpg(0))
    with pytest.raises(DatasetFormatError, match="smiling"):  # checked when listing, before any output
        get_splittable("folder").entries(str(tmp_path / "odd"))
    with pytest.raises(KeyError, match="unknown data set format"):
        get_splittable("nope")


def test_packed_entries_slice_small_and_digest_content(tmp_path):
    write_folder_tree(str(tmp_path))
    e = get_splittable("folder").entries(str(tmp_path))
    part = e[2:5]
    assert len(part) == 3 and list(part.columns["rel"]) == list(e.columns["rel"])[2:5]
    assert part.columns["rel"].blob.nbytes < e.columns["rel"].blob.nbytes  # a copy of its own strings only
    assert e[:].digest() == e.digest() and part.digest() != e.digest()
    with pytest.raises(TypeError):
        e[0]
    with pytest.raises(ValueError, match="differ in length"):
        Entries({"a": e.columns["group"], "b": e.columns["group"][:2]})


# ---------------------------------------------------------------- the table, written in parts


def table_rows(uri: str) -> tuple[list[dict], list[dict]]:
    return Artifact(uri).read(IMAGE_COLS).to_pylist(), Artifact(rejects_uri(uri)).read().to_pylist()


def sequential(fmt: str, root: str, opts: dict, out: str) -> None:
    write_image_table(get_reader(fmt)(root, **opts), out, stage=f"ingest.{fmt}", config={"format": fmt},
                      rows_per_shard=4)


def in_process(fmt: str, root: str, opts: dict, out: str, part_size: int) -> None:
    """The parts written one after the other in this process: what each Ray task does."""
    sp = get_splittable(fmt)
    entries = sp.entries(root, **opts)
    parts = max(1, -(-len(entries) // part_size))
    assert begin_parts(out, {"stage": f"ingest.{fmt}", "config": {"format": fmt}}) is None
    for i in range(parts):
        write_part(sp.read_entries(entries[i * part_size:(i + 1) * part_size]), out, i, stage=f"ingest.{fmt}")
    commit_parts(out, parts, stage=f"ingest.{fmt}", config={"format": fmt})


@pytest.mark.parametrize("name", ["ms1m-recordio", "folder", "fer2013"])
def test_parts_make_the_table_the_one_process_ingest_makes(tmp_path, name):
    fmt, write, opts = SOURCES[name]
    root = str(tmp_path / "src")
    write(root)
    sequential(fmt, root, opts, str(tmp_path / "seq"))
    in_process(fmt, root, opts, str(tmp_path / "par"), part_size=2)
    assert table_rows(str(tmp_path / "par")) == table_rows(str(tmp_path / "seq"))
    seq, par = Artifact(str(tmp_path / "seq")).manifest, Artifact(str(tmp_path / "par")).manifest
    assert par.extra == seq.extra and par.extra["rejects"] > 0
    assert par.stage == seq.stage and Artifact(rejects_uri(str(tmp_path / "par"))).manifest.stage == f"ingest.{fmt}.rejects"
    assert all(s.rows > 0 for s in par.shards)  # parts that kept nothing leave no empty shard


def test_an_empty_source_is_an_empty_table(tmp_path):
    path = tmp_path / "src" / "fer2013.csv"
    put(str(path), "emotion,pixels,Usage\r\n")
    in_process("fer2013", str(path), {}, str(tmp_path / "par"), part_size=4)
    art = Artifact(str(tmp_path / "par"))
    assert len(art) == 0 and art.num_shards == 1 and art.schema.names == IMAGE_COLS
    assert art.manifest.extra == {"rejects": 0, "reject_reasons": {}, "sources": {}}


def test_begin_parts_clears_a_killed_streaming_ingest_and_refuses_others(tmp_path):
    out = str(tmp_path / "out")
    ShardedWriter(out).write_shard(shard_name(0), pa.table({"id": ["x"]}))  # what a killed write_image_table left
    assert begin_parts(out, {"stage": "s", "config": {"a": 1}}) is None
    assert not os.path.exists(os.path.join(out, shard_name(0)))  # unclaimed leftovers: cleared
    with pytest.raises(FileExistsError, match="unfinished run with other inputs or settings"):
        begin_parts(out, {"stage": "s", "config": {"a": 2}})
    put(str(tmp_path / "photos" / "me.jpg"), jpg(0))
    with pytest.raises(ArtifactError, match="refusing to clear it"):
        begin_parts(str(tmp_path / "photos"), {"stage": "s", "config": {}})
    assert os.path.exists(tmp_path / "photos" / "me.jpg")


# ---------------------------------------------------------------- on Ray


def flaky_read_entries(part: Entries):
    """fer2013's read_entries, failing for the part that starts at row ``fail_row``: once (a marker file
    remembers the first attempt) or every time (``always``)."""
    ctx = part.context
    if int(part.columns["row"][0]) == ctx["fail_row"] and (ctx["always"] or not os.path.exists(ctx["flag"])):
        open(ctx["flag"], "w").close()
        raise OSError("injected failure")
    return get_splittable("fer2013").read_entries(part)


def run_parts(fmt, root, opts, out, part_size=2, config=None, read=None, entries=None, **kw):
    from workers.ingest import ingest_parts
    from workers.sharded import PoolConfig

    sp = get_splittable(fmt)
    seen: list[int] = []
    m = ingest_parts(read or sp.read_entries, entries or sp.entries(root, **opts), out, stage=f"ingest.{fmt}",
                     config=config or {"format": fmt}, part_size=part_size,
                     pool=kw.pop("pool", PoolConfig(num_actors=2)), on_part=lambda i, info, r: seen.append(i), **kw)
    return m, seen


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ms1m-recordio", "folder", "fer2013"])
def test_ray_ingest_matches_the_one_process_ingest(tmp_path, ray_local, name):
    fmt, write, opts = SOURCES[name]
    root = str(tmp_path / "src")
    write(root)
    sequential(fmt, root, opts, str(tmp_path / "seq"))
    m, seen = run_parts(fmt, root, opts, str(tmp_path / "par"))
    parts = -(-len(get_splittable(fmt).entries(root, **opts)) // 2)
    assert sorted(seen) == list(range(parts)) and parts >= 4
    assert table_rows(str(tmp_path / "par")) == table_rows(str(tmp_path / "seq"))
    assert m.extra == Artifact(str(tmp_path / "seq")).manifest.extra
    # Finished: the same ingest gets it back untouched, with nothing recomputed.
    again, seen = run_parts(fmt, root, opts, str(tmp_path / "par"))
    assert again.digest == m.digest and seen == []


@pytest.mark.slow
def test_ray_ingest_resumes_a_killed_run_redoing_only_missing_parts(tmp_path, ray_local):
    root = str(tmp_path / "src")
    write_pool_rec(root)
    sequential("ms1m", root, {}, str(tmp_path / "seq"))
    out = str(tmp_path / "par")
    m, _ = run_parts("ms1m", root, {}, out)
    # A kill before the commit, with parts 1 and 3 unwritten and the rejects already committed.
    os.remove(os.path.join(out, "_manifest.json"))
    for i in (1, 3):
        os.remove(os.path.join(out, shard_name(i)))
        os.remove(os.path.join(out, shard_name(i) + ".json"))
    with pytest.raises(FileExistsError, match="unfinished run with other inputs or settings"):
        run_parts("ms1m", root, {}, out, config={"format": "ms1m", "other": 1})
    resumed, seen = run_parts("ms1m", root, {}, out)
    assert sorted(seen) == [1, 3]
    assert resumed.digest == m.digest
    assert table_rows(out) == table_rows(str(tmp_path / "seq"))
    with pytest.raises(FileExistsError, match="finished artifact made from other inputs or settings"):
        run_parts("ms1m", root, {}, out, config={"format": "ms1m", "other": 1})
    with pytest.raises(FileExistsError, match="finished artifact made from other inputs or settings"):
        run_parts("ms1m", root, {}, out, part_size=3)  # another cut into parts: shard i means other entries


@pytest.mark.slow
def test_ray_ingest_retries_a_failing_part_then_names_it(tmp_path, ray_local):
    from workers.ingest import PartFailedError
    from workers.sharded import PoolConfig

    root = str(tmp_path / "src")
    write_fer_csv(root)
    sequential("fer2013", root, {}, str(tmp_path / "seq"))
    e = get_splittable("fer2013").entries(root)
    flaky = Entries(e.columns, {**e.context, "fail_row": 4, "flag": str(tmp_path / "flag"), "always": False})
    _, seen = run_parts("fer2013", root, {}, str(tmp_path / "par"), read=flaky_read_entries, entries=flaky)
    assert os.path.exists(tmp_path / "flag") and sorted(seen) == list(range(6))  # part 2 failed once, then done
    assert table_rows(str(tmp_path / "par")) == table_rows(str(tmp_path / "seq"))
    broken = Entries(e.columns, {**e.context, "fail_row": 2, "flag": str(tmp_path / "flag2"), "always": True})
    with pytest.raises(PartFailedError, match=r"part 1 \(entries 2\.\.3\) failed 2 times; last error: "
                                              r"OSError: injected failure.*finished parts are kept"):
        run_parts("fer2013", root, {}, str(tmp_path / "broken"), read=flaky_read_entries, entries=broken,
                  pool=PoolConfig(num_actors=2, max_retries=1))


@pytest.mark.slow
def test_flow_ingest_stage_runs_in_parts_on_ray(tmp_path, ray_local):
    from flows.config import DataSource, RaySection
    from flows.steps import ingest

    root = str(tmp_path / "src")
    write_fer_csv(root)
    src = DataSource(format="fer2013", root=root, rows_per_shard=3)
    ingest(src)(str(tmp_path / "seq"))  # no Ray section: in this process
    ingest(src, RaySection(workers=2))(str(tmp_path / "par"))
    assert not os.path.exists(tmp_path / "seq" / "_claim.json")
    assert os.path.exists(tmp_path / "par" / "_claim.json")  # written in parts
    assert table_rows(str(tmp_path / "par")) == table_rows(str(tmp_path / "seq"))
    par, seq = Artifact(str(tmp_path / "par")).manifest, Artifact(str(tmp_path / "seq")).manifest
    assert par.extra == seq.extra and par.config == seq.config and par.stage == seq.stage == "ingest.fer2013"
    assert max(s.rows for s in par.shards) <= 3  # a part is rows_per_shard entries
    # A source without random access takes the one-process path even with Ray.
    write_pool_rec(str(tmp_path / "rec"))
    os.remove(tmp_path / "rec" / "train.idx")
    ingest(DataSource(format="ms1m", root=str(tmp_path / "rec")), RaySection())(str(tmp_path / "rec-out"))
    assert len(Artifact(str(tmp_path / "rec-out"))) > 0 and not os.path.exists(tmp_path / "rec-out" / "_claim.json")
    # parallel: false keeps the one-process path (ROOT only on the flow's machine); same table, same identity.
    one = DataSource(format="fer2013", root=root, rows_per_shard=3, parallel=False)
    ingest(one, RaySection(workers=2))(str(tmp_path / "one"))
    assert not os.path.exists(tmp_path / "one" / "_claim.json")
    assert table_rows(str(tmp_path / "one")) == table_rows(str(tmp_path / "par"))
    assert one.ingest_config() == src.ingest_config()


@pytest.mark.slow
def test_cli_ingest_reads_in_parts_on_ray_and_resumes_after_a_kill(tmp_path, ray_local, capsys):
    """`fermine ingest` reads a source with random access in parts on Ray by default (`--workers 1`: in
    this process): the same table, and a rerun after a kill reads only the parts that were missing."""
    from test_readers import run_cli

    root = str(tmp_path / "src")
    write_pool_rec(root)
    one, par = str(tmp_path / "one"), str(tmp_path / "par")
    code, _, err = run_cli(["ingest", "ms1m", root, one, "--rows-per-shard", "3", "--workers", "1"], capsys)
    assert code == 0, err
    assert not os.path.exists(os.path.join(one, "_claim.json"))  # read in this process
    code, _, err = run_cli(["ingest", "ms1m", root, par, "--rows-per-shard", "3", "--workers", "2"], capsys)
    assert code == 0, err
    assert os.path.exists(os.path.join(par, "_claim.json"))  # read in parts on Ray
    assert table_rows(par) == table_rows(one)
    assert Artifact(par).manifest.extra == Artifact(one).manifest.extra
    assert Artifact(par).manifest.config == Artifact(one).manifest.config
    # Killed before its commit with part 1 unwritten: the rerun writes part 1 only.
    os.remove(os.path.join(par, "_manifest.json"))
    os.remove(os.path.join(par, shard_name(1)))
    os.remove(os.path.join(par, shard_name(1) + ".json"))
    kept = {n: os.path.getmtime(os.path.join(par, n)) for n in os.listdir(par) if n.endswith(".parquet")
            and n.startswith("part-")}
    assert len(kept) >= 2
    code, _, err = run_cli(["ingest", "ms1m", root, par, "--rows-per-shard", "3", "--workers", "2"], capsys)
    assert code == 0, err
    assert {n: os.path.getmtime(os.path.join(par, n)) for n in kept} == kept
    assert table_rows(par) == table_rows(one)
    # Another cut into parts on an unfinished folder is refused with advice, not a traceback.
    os.remove(os.path.join(par, "_manifest.json"))
    code, _, err = run_cli(["ingest", "ms1m", root, par, "--rows-per-shard", "4"], capsys)
    assert code == 2 and "choose another output or delete it" in err and "Traceback" not in err
    code, _, err = run_cli(["ingest", "ms1m", root, str(tmp_path / "x"), "--workers", "0"], capsys)
    assert code == 2 and "--workers must be at least 1" in err
