"""A stage's code version covers the code that computes it, not the whole tree; `--rerun STAGE`.

The real stage bodies of flows/steps.py are built with small configs and never run: their code
versions are computed with module sources read through a hook, so "editing" tasks/caf/method.py or
tasks/pasm/attack.py here never touches the real files.
"""

import hashlib
import json

import pytest

import flows.code_version as stage_mod
from flows import steps
from flows.config import load_config, packaged_config
from flows.code_version import code_version, module_imports, reached_modules, read_module, stage_code
from flows.stage import Run, request_reruns
from storage import ArtifactWriter


def _edited(*modules):
    """A module reader that appends a comment to each of ``modules``: an edit that changes their bytes."""
    def read(name):
        src = read_module(name)
        return src + b"\n# an edit\n" if name in modules and src is not None else src

    return read


@pytest.fixture(scope="module")
def bodies():
    """The round's stage bodies (flows/steps.py closures) built from the demo config, as flows/round.py does."""
    cfg = load_config(packaged_config("demo"))
    st = steps.resolve_configs(cfg, check_paths=False)
    pasm, teacher = st["pasm"], st["teacher"]
    att = steps.round_attack_config(st["attack"], 1)
    return {
        "ingest": steps.ingest(cfg.labeled),
        "align": steps.align(st["align"], "mem://images", cfg.ray),
        "teacher": steps.train(teacher, ["mem://labeled"]),
        "evaluate": steps.evaluate("mem://teacher", {"inner": ("mem://labeled", ("test",))}),
        "attack": steps.attack(att, "mem://teacher", "mem://labeled", cfg.ray),
        "erase": steps.erase(steps.erase_config(pasm, random_position=False, seed=1), "mem://labeled", "mem://att"),
        "student": steps.student(steps.student_config(teacher, pasm, 1), pasm, "mem://erased", "mem://labeled",
                                 "mem://teacher"),
        "cam": steps.cam(steps.cam_config(teacher.train_splits), "mem://teacher", "mem://labeled"),
        "figure-pasm": steps.pasm_figure([], "mem://labeled"),
        "centroids": steps.centroids(st["centroids"], "mem://teacher", "mem://labeled"),
        "mine": steps.mine(st["mine"], "mem://teacher", "mem://cent", "mem://pool", cfg.ray, {}),
        "distill": steps.distill(st["distill"], "mem://aux"),
    }


def test_editing_caf_leaves_every_round_stage_version_unchanged(bodies):
    for name, fn in bodies.items():
        assert "tasks.caf.method" not in reached_modules(stage_code(fn).roots), name
        before = code_version(fn, read=read_module)
        assert before == code_version(fn)  # the hook reading the real files = the cached default
        assert code_version(fn, read=_edited("tasks.caf.method")) == before, name
    # The whole-tree version (the old rule, still the fallback) does change: that was the bug.
    assert code_version(read=_edited("tasks.caf.method")) != code_version(read=read_module)


def test_editing_the_attack_changes_the_attack_and_its_dependents_not_upstream(bodies):
    edit = _edited("tasks.pasm.attack")
    changed = {name for name, fn in bodies.items() if code_version(fn, read=edit) != code_version(fn)}
    assert "attack" in changed
    assert "student" in changed  # tasks.pasm.student (the student's training) imports tasks.pasm.attack
    for upstream in ("ingest", "align", "teacher", "evaluate"):
        assert upstream not in changed, upstream
    edit = _edited("workers.attack")  # the Ray side of the attack: the attack stage only
    assert {name for name, fn in bodies.items() if code_version(fn, read=edit) != code_version(fn)} == {"attack"}


def test_reached_modules_follow_lazy_imports_submodules_and_dynamic_loading(bodies):
    teacher = reached_modules(stage_code(bodies["teacher"]).roots)
    # tasks.train imports tasks.evaluate inside a function; tasks.evaluate does `from tasks import metrics`.
    assert {"tasks.train", "tasks.evaluate", "tasks.metrics", "tasks.engine.checkpoint", "tasks.models"} <= set(teacher)
    assert "storage" in teacher  # importing storage.artifact runs storage/__init__.py
    # storage.readers loads every reader with importlib/pkgutil: the ingest stage reaches them all.
    ingest = reached_modules(stage_code(bodies["ingest"]).roots)
    assert {"storage.readers.rafdb", "storage.readers.fer2013", "storage.synthetic"} <= set(ingest)
    # Ingest in parts runs on Ray (workers.ingest); no training or method code reaches it.
    assert not any(m.startswith("tasks.") for m in ingest)
    assert {m for m in ingest if m.startswith("workers.")} == {"workers.cluster", "workers.ingest", "workers.sharded"}
    assert module_imports("tasks.evaluate", b"from tasks import metrics as M\nfrom . import data\n") == {
        "tasks", "tasks.metrics", "tasks.data"}
    # The stage body's own source and the flow helpers it calls count too.
    names = [k for k, _ in stage_code(bodies["attack"]).sources]
    assert "flows.steps.attack.<locals>.fn" in names and "flows.steps.connect_ray" in names


def test_a_body_without_source_falls_back_to_the_whole_tree():
    scope = {}
    exec("def fn(out):\n    return out\n", scope)  # no file: inspect cannot find the source
    assert stage_code(scope["fn"]) is None
    assert code_version(scope["fn"]) == code_version()


# ---- end to end through Run.stage, toy stage bodies (no Prefect, no training) -----------------
def _write(out, payload):
    with ArtifactWriter(out, stage="unit", rows_per_shard=4) as w:
        w.write_rows([{"id": "0", "x": str(payload)}])


def _toy_round(run, calls):
    """ingest -> teacher -> attack -> erase -> student, each body importing the module its real one runs."""
    def ingest(out):
        from storage.ingest import write_image_table  # noqa: F401

        calls.append("ingest")
        _write(out, "images")

    def teacher(out):
        from tasks.train import train  # noqa: F401

        calls.append("teacher")
        _write(out, "teacher")

    def attack(out):
        from workers.attack import attack_artifact  # noqa: F401

        calls.append("attack")
        # A real fix of the attack changes what it writes: the output follows tasks/pasm/attack.py's source.
        _write(out, hashlib.sha256(stage_mod.read_module("tasks.pasm.attack")).hexdigest())

    def erase(out):
        from tasks.pasm.erase import erase_table  # noqa: F401

        calls.append("erase")
        _write(out, "erased")

    def student(out):
        from tasks.pasm.student import train_student  # noqa: F401

        calls.append("student")
        _write(out, "student")

    img = run.stage("ingest", {}, {}, ingest)
    tea = run.stage("teacher", {}, {"train": img.uri}, teacher)
    att = run.stage("attack-r1", {}, {"teacher": tea.uri, "images": img.uri}, attack)
    era = run.stage("erase-r1", {}, {"positions": att.uri}, erase)
    stu = run.stage("student-r1", {}, {"erased": era.uri, "teacher": tea.uri}, student)
    return {r.stage: r for r in (img, tea, att, era, stu)}


def test_round_reuse_after_edits_through_run_stage(tmp_path, monkeypatch):
    run = Run(str(tmp_path / "run"))
    calls = []
    first = _toy_round(run, calls)
    assert calls == ["ingest", "teacher", "attack", "erase", "student"]

    real = stage_mod.read_module
    for edited, recomputed in ((("tasks.caf.method",), []), (("tasks.pasm.attack",), ["attack", "erase", "student"])):
        monkeypatch.setattr(stage_mod, "read_module", lambda m, e=edited: real(m) + b"\n# edit\n" if m in e else real(m))
        code_version.cache_clear()
        calls.clear()
        again = _toy_round(run, calls)
        assert calls == recomputed, edited
        for name in ("ingest", "teacher"):
            assert again[name].reused and again[name].uri == first[name].uri
    code_version.cache_clear()


def _chain(run, calls):
    """a -> b -> c, and d from a alone; b and c write the same bytes whenever they run."""
    def body(name, payload):
        def fn(out):
            calls.append(name)
            _write(out, payload)

        return fn

    a = run.stage("a", {}, {}, body("a", 1))
    b = run.stage("b", {}, {"a": a.uri}, body("b", 2))
    c = run.stage("c", {}, {"b": b.uri}, body("c", 3))
    d = run.stage("d", {}, {"a": a.uri}, body("d", 4))
    return {r.stage: r for r in (a, b, c, d)}


def test_rerun_recomputes_the_stage_and_its_dependents_only(tmp_path):
    run = Run(str(tmp_path / "run"))
    calls = []
    first = _chain(run, calls)
    assert calls == ["a", "b", "c", "d"]

    assert run.request_rerun(["b"]) == {"b": 1}
    calls.clear()
    second = _chain(run, calls)
    # b's output is byte-identical, yet c recomputes: the rerun count travels in b's record.
    assert calls == ["b", "c"]
    assert second["b"].digest == first["b"].digest and second["b"].uri != first["b"].uri
    assert second["c"].uri != first["c"].uri and second["c"].reruns == {"b": 1}
    assert second["a"].uri == first["a"].uri and second["d"].uri == first["d"].uri

    calls.clear()
    third = _chain(run, calls)  # a plain rerun keeps the fresh results
    assert calls == [] and all(third[k].uri == second[k].uri for k in third)

    run.request_rerun(["b"])
    run.request_rerun(["a"])
    assert json.loads((tmp_path / "run" / "reruns.json").read_text()) == {"a": 1, "b": 2}
    calls.clear()
    _chain(run, calls)
    assert calls == ["a", "b", "c", "d"]


def test_rerun_names_must_be_recorded_stages_globs_allowed(tmp_path):
    run = Run(str(tmp_path / "run"))
    for name in ("attack-r1", "attack-r2", "teacher"):
        run.stage(name, {}, {}, lambda out: _write(out, 0))
    with pytest.raises(ValueError, match="techer.*attack-r1, attack-r2, teacher"):
        run.request_rerun(["techer"])
    assert run.reruns() == {}  # nothing bumped when one name is wrong
    assert run.request_rerun(["attack-r*"]) == {"attack-r1": 1, "attack-r2": 1}
    with pytest.raises(ValueError, match="no recorded stages"):
        request_reruns(str(tmp_path / "fresh"), ["teacher"])
    assert not (tmp_path / "fresh").exists()


def test_run_cli_rerun_bumps_before_the_flow_and_refuses_unknown_names(tmp_path, monkeypatch, capsys):
    import flows.commands.run as run_cmd
    from flows.cli import main

    out = tmp_path / "run"
    Run(str(out)).stage("teacher", {}, {}, lambda o: _write(o, 0))
    seen = []
    monkeypatch.setattr(run_cmd, "_run_flow", lambda cfg: seen.append(Run(cfg.out).reruns()) or {"run": cfg.out})
    demo = str(packaged_config("demo"))
    main(["run", demo, f"--set=out={out}", "--rerun", "teacher"])
    assert seen == [{"teacher": 1}]  # recorded before the flow started
    assert "recomputing teacher (rerun #1)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["run", demo, f"--set=out={out}", "--rerun", "attack-r9"])
    assert e.value.code == 2 and "its stages: teacher" in capsys.readouterr().err
    assert len(seen) == 1
