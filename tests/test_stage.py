"""Stages and runs: identity, reuse, resume, records, where a stage ran, locks, the timeline, the run log."""

import os

import pytest

from flows.config import ConfigError, apply_overrides, build_dataclass, load_config
from flows.stage import Run, read_record
from storage import Artifact, ArtifactWriter


def _write(n):
    def fn(out):
        with ArtifactWriter(out, stage="unit", rows_per_shard=2) as w:
            w.write_rows([{"id": str(i), "x": i} for i in range(n)])

    return fn


def test_stage_is_reused_when_identity_matches(tmp_path):
    run = Run(str(tmp_path / "run"))
    calls = []

    def fn(out):
        calls.append(out)
        _write(3)(out)

    a = run.stage("make", {"n": 3}, {}, fn)
    b = run.stage("make", {"n": 3}, {}, fn)
    assert len(calls) == 1 and b.reused and a.uri == b.uri and a.digest == b.digest
    c = run.stage("make", {"n": 4}, {}, fn)  # other config -> other identity -> recomputed
    assert len(calls) == 2 and c.uri != a.uri


def test_downstream_identity_follows_upstream_content(tmp_path):
    run = Run(str(tmp_path / "run"))
    up1 = run.stage("up", {"n": 3}, {}, _write(3))
    up2 = run.stage("up", {"n": 4}, {}, _write(4))
    d1 = run.stage("down", {}, {"src": up1.uri}, lambda out: _write(1)(out))
    d2 = run.stage("down", {}, {"src": up2.uri}, lambda out: _write(1)(out))
    assert d1.uri != d2.uri


def test_killed_stage_resumes_in_same_folder_and_is_not_reused(tmp_path):
    run = Run(str(tmp_path / "run"))

    def crash(out):
        w = ArtifactWriter(out, stage="unit", rows_per_shard=1)
        w.write_rows([{"id": "a"}])
        raise KeyboardInterrupt  # killed mid-stage

    with pytest.raises(KeyboardInterrupt):
        run.stage("s", {}, {}, crash)
    st = {r["stage"]: r for r in run.status()}
    assert st["s"]["state"] == "failed" and "KeyboardInterrupt" in st["s"]["error"]
    rec = run.stage("s", {}, {}, _write(2))
    assert not rec.reused and len(Artifact(rec.uri)) == 2
    assert read_record(rec.uri).identity == rec.identity
    done = {r["stage"]: r for r in run.status()}["s"]
    assert done["state"] == "finished" and "error" not in done  # the old failure is not shown as current


def test_status_cli_shows_each_stage_state_and_output(tmp_path, capsys):
    """`fermine status RUN`: finished, failed and killed (started, never finished) stages, one row each."""
    import json

    from flows.cli import main
    from flows.stage import LEDGER

    root = tmp_path / "run"
    run = Run(str(root))
    done = run.stage("ingest", {"n": 2}, {}, _write(2))
    with pytest.raises(ValueError):
        run.stage("teacher", {}, {"images": done.uri}, lambda out: (_ for _ in ()).throw(ValueError("diverged")))
    # A process killed mid-stage leaves only its "started" event.
    with open(root / LEDGER, "a") as f:
        f.write(json.dumps({"event": "started", "stage": "attack-r1", "uri": str(root / "attack-r1-x"), "time": 0}) + "\n")
    main(["status", str(root)])
    lines = {ln.split("│")[1].strip(): ln for ln in capsys.readouterr().out.splitlines() if ln.count("│") >= 5}
    assert "finished" in lines["ingest"] and done.uri.rsplit("/", 1)[-1] in lines["ingest"]
    assert "failed" in lines["teacher"]
    assert "running or" in lines["attack-r1"]
    with pytest.raises(SystemExit) as e:
        main(["status", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "no recorded stages" in capsys.readouterr().err


def test_torn_stage_record_means_unfinished(tmp_path):
    run = Run(str(tmp_path / "run"))
    rec = run.stage("s", {}, {}, _write(1))
    (tmp_path / "run" / rec.uri.rsplit("/", 1)[1] / "_stage.json").write_text("{")
    calls = []
    run.stage("s", {}, {}, lambda out: (calls.append(1), _write(1)(str(tmp_path / "run" / "other")))[0])
    assert calls == [1]


def test_config_overrides_and_validation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nteacher: {epochs: 2}\n")
    cfg = load_config(p, ["teacher.lr=0.05", "ray.workers=3", "labeled.options.size=32"])
    assert cfg.teacher == {"epochs": 2, "lr": 0.05} and cfg.ray.workers == 3 and cfg.labeled.options == {"size": 32}
    with pytest.raises(ConfigError, match="nmae|extra|not permitted"):
        load_config(None, ["nmae=x"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_build_dataclass_rejects_unknown_and_bad_types():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class C:
        epochs: int = 3
        lr: float = 0.01

    assert build_dataclass(C, {"epochs": "5"}, "teacher") == C(epochs=5)
    with pytest.raises(ConfigError, match="epochz"):
        build_dataclass(C, {"epochz": 1}, "teacher")
    with pytest.raises(ConfigError, match="teacher.lr"):
        build_dataclass(C, {"lr": "fast"}, "teacher")


def test_packaged_configs_resolve_and_run_refuses_bad_settings_before_starting(capsys):
    from flows.cli import main
    from flows.config import packaged_config
    from flows.steps import resolve_configs

    for name in ("demo", "round"):
        stages = resolve_configs(load_config(packaged_config(name)), check_paths=False)
        assert stages["pasm"].train == stages["teacher"]  # PASM trains with the run's teacher recipe
    for bad, why in ((["teacher.epoch=3"], "unknown setting"), (["pipeline=evaluate"], "needs `model`"),
                     (["pasm.rounds=0"], "rounds must be >= 1"),
                     (["labeled.format=rafdbx"], "labeled.format: unknown data set format 'rafdbx'"),
                     (["labeled.options.colour=1"], "labeled.options: format synthetic has no option colour"),
                     (["cross=[{format: rafdb, root: /no/such/raf}]"], "cross[0].root: /no/such/raf does not exist"),
                     (["pool={format: ms1m}"], "pool.root: format ms1m needs")):
        with pytest.raises(SystemExit) as e:
            main(["run", str(packaged_config("demo")), *[f"--set={s}" for s in bad]])
        assert e.value.code == 2
        assert why in capsys.readouterr().err


def test_code_version_follows_the_source_of_the_computations(tmp_path, monkeypatch):
    import flows.code_version as stage_mod

    pkg = tmp_path / "fermine_fake_tasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("LR = 0.01\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(stage_mod, "COMPUTING_PACKAGES", ("fermine_fake_tasks",))
    stage_mod.code_version.cache_clear()
    try:
        before = stage_mod.code_version()
        assert stage_mod.code_version() == before  # stable
        (pkg / "train.py").write_text("LR = 0.02\n")  # an edited stage body
        stage_mod.code_version.cache_clear()
        assert stage_mod.code_version() != before
    finally:
        stage_mod.code_version.cache_clear()


def test_stage_code_version_covers_the_modules_the_body_reaches_only(tmp_path, monkeypatch):
    """Per stage: a body's version follows the modules it imports (transitively), not the others'."""
    import flows.code_version as stage_mod

    pkg = tmp_path / "fermine_fake_stage_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("def train():\n    from fermine_fake_stage_pkg import util\n    return util.LR\n")
    (pkg / "util.py").write_text("LR = 0.01\n")
    (pkg / "caf.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(stage_mod, "COMPUTING_PACKAGES", ("fermine_fake_stage_pkg",))

    def body(out):
        from fermine_fake_stage_pkg.train import train  # noqa: F401  (never imported: only read)

    def version():
        stage_mod.code_version.cache_clear()
        return stage_mod.code_version(body)

    try:
        before = version()
        assert stage_mod.reached_modules(stage_mod.stage_code(body).roots) == [
            "fermine_fake_stage_pkg", "fermine_fake_stage_pkg.train", "fermine_fake_stage_pkg.util"]
        (pkg / "caf.py").write_text("X = 1  # a comment\n")  # another stage's module
        assert version() == before
        (pkg / "util.py").write_text("LR = 0.02\n")  # imported by what the body imports
        assert version() != before
        # A constant imported at the top of the body's module counts as well (its type would not tell).
        (tmp_path / "fermine_fake_stage_flow.py").write_text(
            "from fermine_fake_stage_pkg.util import LR\n\n\ndef body(out):\n    return LR\n")
        import fermine_fake_stage_flow

        assert stage_mod.stage_code(fermine_fake_stage_flow.body).roots == {"fermine_fake_stage_pkg.util"}
    finally:
        stage_mod.code_version.cache_clear()


def test_two_chains_reaching_one_stage_compute_it_once_and_the_record_says_where(tmp_path):
    """Concurrent chains of a round may ask for the same stage (PASM w/o teacher reuses round 1's attack):
    it is computed once, the other caller reuses it; the record names the placer's answer."""
    import threading
    import time

    run = Run(str(tmp_path / "run"))
    calls = []

    def slow(out):
        calls.append(out)
        time.sleep(0.3)
        _write(2)(out)

    def placer(fn, out):
        fn(out)
        return {"host": "gpu-node", "node_id": "abc", "device": "cuda:0 (test)", "pid": 1, "started": 0.0,
                "finished": 1.0}

    recs = []
    threads = [threading.Thread(target=lambda: recs.append(run.stage("shared", {"n": 2}, {}, slow, placer)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r.reused for r in recs) == [False, True]
    assert read_record(recs[0].uri).placement["host"] == "gpu-node"
    row = next(r for r in run.status() if r["stage"] == "shared")
    assert row["state"] == "reused"
    done = next(e for e in run.events() if e["event"] == "finished")
    assert done["placement"]["device"] == "cuda:0 (test)" and done["started"] <= done["time"]
    plain = run.stage("plain", {}, {}, _write(1))  # no placer: computed in this process
    assert plain.placement["device"] == "driver" and plain.placement["pid"] > 1


def test_the_stage_line_counts_the_wait_for_resources_apart(tmp_path, caplog):
    """A placed stage that waited for a worker: its console line's seconds are the computation's, the
    wait is said apart (flows.console)."""
    import logging
    import time

    def placer(fn, out):
        time.sleep(1.2)  # queued until a worker with the stage's resources is free
        started = time.time()
        fn(out)
        return {"host": "w1", "node_id": "n1", "device": "cpu", "pid": 2, "started": started, "finished": time.time()}

    run = Run(str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="fermine.progress"):
        run.stage("queued", {}, {}, _write(1), placer)
    done = next(r for r in caplog.records if getattr(r, "event", None) == "finished")
    assert done.waited >= 1.2 and done.seconds < 1.0


def test_report_draws_the_timeline_by_where_stages_ran(tmp_path):
    from flows.report import _timeline_svg, timeline_rows

    run = Run(str(tmp_path / "run"))
    run.stage("a", {}, {}, _write(1))
    run.stage("b", {}, {}, _write(1), lambda fn, out: {**{"host": "w1", "node_id": "n1", "device": "cpu", "pid": 2},
                                                       "started": __import__("time").time(),
                                                       "finished": __import__("time").time(), **({} if fn(out) else {})})
    rows = timeline_rows(run)
    assert [r["stage"] for r in rows] == ["a", "b"]
    assert rows[0]["lane"].endswith("flow process") and rows[1]["lane"] == "w1 / cpu (node n1)"
    assert rows[0]["start"] == pytest.approx(0.0, abs=0.05) and all(r["end"] >= r["start"] for r in rows)
    svg = _timeline_svg(rows)
    assert svg.count("<rect") == 2 and "w1 / cpu" in svg and "flow process" in svg
    assert _timeline_svg([]) == ""


def _logs_two_epochs(out: str) -> None:
    import logging

    os.makedirs(out, exist_ok=True)
    for e in (1, 2):
        logging.getLogger("fermine.stage").info("train: epoch %d/2, loss 0.5", e)


def test_a_placed_stage_writes_its_progress_to_the_run_log(tmp_path, ray_local):
    from flows.config import RaySection
    from flows.placement import RayPlacer

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    where = RayPlacer(RaySection(num_cpus=2))(_logs_two_epochs, str(run / "teacher-abc"))
    assert where["pid"] != os.getpid()  # it ran in a Ray worker ...
    lines = (run / "logs" / "run.log").read_text().splitlines()
    # ... and its epoch lines reached the run's log, with the worker's pid
    assert [ln.split(": ", 1)[1] for ln in lines if "epoch" in ln] == ["train: epoch 1/2, loss 0.5",
                                                                        "train: epoch 2/2, loss 0.5"]
    assert f"pid {where['pid']}" in lines[0]


def test_a_request_no_node_can_hold_is_refused_not_queued_forever(tmp_path, ray_local):
    from workers.cluster import ResourcesUnavailableError, workers_fitting
    from workers.placement import Resources, run_placed
    from workers.train import run_data_parallel

    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0}]
    assert workers_fitting(nodes, {"CPU": 4.0, "GPU": 1.0}) == 2  # the GPU node holds two, the CPU node none
    assert workers_fitting(nodes, {"CPU": 2.0, "GPU": 0.0}) == 6
    with pytest.raises(ResourcesUnavailableError, match=r"1 GPU.*ray.gpus_per_worker"):
        run_placed(_logs_two_epochs, str(tmp_path / "teacher-x"), Resources(cpus=1, gpus=1))
    with pytest.raises(ResourcesUnavailableError, match=r"3 x \(1 CPU\)"):
        run_data_parallel(_logs_two_epochs, str(tmp_path / "teacher-y"), 3, Resources(cpus=1))
    assert not (tmp_path / "teacher-x").exists()  # refused before anything ran
