"""The PASM and omni pipelines wire the papers' comparisons as published (slow: real stages, tiny data).

PASM Table VII: random erasing (online, Zhong et al.), adversarial erasing (attention) and PASM w/o teacher,
each one round, no teacher term, from the teacher's initialisation; the random-erasing ablation of the
rounds; a seed per round. Omni: the pool never holds test rows; DAS distilled for the retrained network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import RunConfig

pytestmark = pytest.mark.slow

TINY = {
    "seed": 0,
    "labeled": {"format": "synthetic", "rows_per_shard": 32,
                "options": {"size": 32, "train_per_class": 4, "test_per_class": 2, "pool_size": 28}},
    "align": {"size": 32, "detect": "never"},
    "teacher": {"arch": "small_cnn", "input_size": 32, "epochs": 1, "batch_size": 16},
    "attack": {"popsize": 4, "generations": 1},
    "ray": {"workers": 1},
    "report": False,
}


def _run(tmp_path: Path, name: str, pipeline: str, **sections) -> tuple[dict, Path]:
    from flows.round import FLOWS

    out = tmp_path / name
    cfg = RunConfig.model_validate({**TINY, "name": name, "out": str(out), "pipeline": pipeline, **sections})
    return FLOWS[pipeline](cfg=cfg), out


def _stages(out: Path) -> dict[str, dict]:
    recs = {}
    for line in (out / "ledger.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "finished":
            recs[e["stage"]] = e
    return recs


def _train_metrics(uri: str) -> dict:
    return json.loads((Path(uri) / "metrics.json").read_text())


def _manifest_config(uri: str) -> dict:
    return json.loads((Path(uri) / "_manifest.json").read_text())["config"]


def test_pasm_rounds_and_table7_conditions(tmp_path):
    summary, out = _run(tmp_path, "pasm", "pasm", pasm={"rounds": 2, "student_epochs": 1})
    st = _stages(out)
    models = [r["model"] for r in summary["results"]]
    assert models == ["teacher", "pasm-r1", "pasm-r2", "random-erasing", "adversarial-erasing", "pasm-no-teacher"]
    # Each round searches with its own seed.
    assert _manifest_config(st["attack-r1"]["uri"])["seed"] != _manifest_config(st["attack-r2"]["uri"])["seed"]
    # The rounds: Eq. 4 with the teacher, refined from it.
    r1 = _train_metrics(st["student-r1"]["uri"])
    assert r1["teacher"] is True and r1["init_from"] == st["teacher"]["uri"] and r1["config"]["beta"] == 0.1
    # Table VII: no teacher term, the teacher's initialisation and epochs, only the erasing differs.
    for name, data in (("student-random-erasing", [st["align"]["uri"]]),
                       ("student-adversarial-erasing", [st["erase-cam"]["uri"]]),
                       ("student-no-teacher", [st["erase-r1"]["uri"]])):
        m = _train_metrics(st[name]["uri"])
        assert (m["teacher"], m["init_from"], m["config"]["beta"], m["config"]["epochs"]) == (False, None, 0.0, 1), name
        assert m["train_uris"] == data, name
        assert m["config"]["random_erasing"] == (0.5 if name == "student-random-erasing" else 0.0)
    assert "erase-random" not in st  # online random erasing has no offline table


def test_no_erasing_control_is_round_one_on_the_original_images(tmp_path):
    """The rounds' control differs from round 1's student in its training data only."""
    summary, out = _run(tmp_path, "ne", "pasm", pasm={"rounds": 1, "compare": ["no_erasing"], "student_epochs": 1,
                                                       "student_lr_step": 1, "student_data": "both"})
    st = _stages(out)
    assert [r["model"] for r in summary["results"]] == ["teacher", "pasm-r1", "pasm-no-erasing"]
    r1, ne = _train_metrics(st["student-r1"]["uri"]), _train_metrics(st["student-no-erasing"]["uri"])
    assert ne["train_uris"] == [st["align"]["uri"]]  # the originals, once (not twice with "both")
    assert r1["train_uris"] == [st["erase-r1"]["uri"], st["align"]["uri"]]
    assert ne["teacher"] is True and ne["init_from"] == st["teacher"]["uri"]
    assert ne["config"] == r1["config"] and ne["config"]["lr_step"] == 1  # same recipe, same seed


def test_random_erasing_ablation_replaces_the_attack(tmp_path):
    summary, out = _run(tmp_path, "re", "pasm", pasm={"rounds": 1, "random_erasing": True, "compare": [],
                                                       "student_epochs": 1})
    st = _stages(out)
    assert [r["model"] for r in summary["results"]] == ["teacher", "random-erasing-r1"]
    assert "erase-random-r1" in st and not any(s.startswith("attack") for s in st)
    assert _train_metrics(st["student-r1"]["uri"])["train_uris"] == [st["erase-random-r1"]["uri"]]


def test_omni_mines_only_the_pool_split_and_distils_for_the_retrained_net(tmp_path):
    from storage.artifact import Artifact

    _, out = _run(tmp_path, "omni", "omni", mine={"margin": -2.0}, distill={"outer_steps": 2, "n_inits": 1,
                                                                          "real_batch": 16})
    st = _stages(out)
    ids = Artifact(st["mine"]["uri"]).read(["id"]).column("id").to_pylist()
    # Margin -2 keeps every row mining examined: all 28 pool faces, and not one train or test image.
    assert len(ids) == 28 and all(i.startswith("synthetic/pool/") for i in ids)
    dist = _manifest_config(st["distill"]["uri"])
    assert (dist["arch"], dist["image_size"]) == ("small_cnn", 32)
