"""A round of several methods: one DAG over one ingest/align, a results section per method."""

import json

import pytest

from flows.config import ConfigError, RunConfig
from flows.steps import resolve_configs

TINY_DATA = {"format": "synthetic", "rows_per_shard": 128,
             "options": {"size": 32, "train_per_class": 12, "val_per_class": 3, "test_per_class": 5,
                         "pool_size": 40}}


def _cfg(tmp_path, **kw) -> RunConfig:
    return RunConfig.model_validate({
        "name": "multi", "out": str(tmp_path / "run"), "pipeline": "round", "labeled": TINY_DATA,
        "align": {"size": 32}, **kw})


def test_methods_are_validated_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="methods: only pipeline round"):
        resolve_configs(_cfg(tmp_path, pipeline="pasm", methods=["pasm", "pt"]), check_paths=False)
    with pytest.raises(ConfigError, match=r"pt: \['labeled_uri'\] name data of its own"):
        resolve_configs(_cfg(tmp_path, methods=["pt"], pt={"labeled_uri": "synthetic"}), check_paths=False)
    with pytest.raises(ConfigError, match=r"caf.config.epochs"):
        resolve_configs(_cfg(tmp_path, methods=["caf"], caf={"config": {"epochs": "many"}}), check_paths=False)
    with pytest.raises(Exception, match="methods"):
        RunConfig.model_validate({"methods": ["pasm", "nosuch"]})
    assert _cfg(tmp_path, methods=["featloss", "pasm"]).round_methods() == ["pasm", "featloss"]  # DAG order
    assert _cfg(tmp_path).round_methods() == ["pasm", "omni"]


def test_table_sources_and_a_given_teacher_are_checked_before_anything_runs(tmp_path):
    missing = str(tmp_path / "nosuch")
    with pytest.raises(ConfigError, match="labeled.root: no finished image table"):
        resolve_configs(_cfg(tmp_path, labeled={"format": "table", "root": missing}))
    with pytest.raises(ConfigError, match="used as it is"):
        resolve_configs(_cfg(tmp_path, labeled={"format": "table", "root": missing, "options": {"size": 32}}))
    with pytest.raises(ConfigError, match="teacher_checkpoint: no finished checkpoint"):
        resolve_configs(_cfg(tmp_path, teacher_checkpoint=missing))
    assert not (tmp_path / "run").exists()  # nothing was created for a config that cannot run


@pytest.mark.slow
def test_a_round_of_pt_caf_and_featloss_shares_one_aligned_table_and_reports_each(tmp_path):
    from flows.round import round_flow
    from flows.stage import Run

    cfg = _cfg(tmp_path, methods=["pt", "caf", "featloss"],
               pt={"noise_rates": [0.3], "compare": False, "synthetic_pretrain": False,
                   "config": {"epochs": 1, "batch_size": 16, "input_size": 32, "device": "cpu"}},
               caf={"compare": True, "config": {"epochs": 1, "batch_size": 16, "device": "cpu"}},
               featloss={"variants": ["none", "fixed"], "config": {"epochs": 1, "batch_size": 16, "device": "cpu"}})
    summary = round_flow(cfg=cfg)
    stages = {r["stage"] for r in Run(cfg.out).status()}
    # One ingest and align feed every method; no teacher is trained when neither PASM nor omni runs.
    assert {"ingest", "align"} <= stages and "teacher" not in stages
    assert not {s for s in stages if s.startswith("ingest") or s.startswith("align")} - {"ingest", "align"}
    assert {"pt.noise-symmetric-30", "pt.pt-30", "pt.eval-pt-30", "caf.train-baseline", "caf.train-caf",
            "caf.eval-caf", "featloss.features", "featloss.train-none", "featloss.train-fixed"} <= stages
    align = next(r["uri"] for r in Run(cfg.out).status() if r["stage"] == "align")
    for name in ("pt.noise-symmetric-30", "caf.train-caf", "featloss.features"):
        rec = json.loads(open(next(r["uri"] for r in Run(cfg.out).status() if r["stage"] == name)
                              + "/_stage.json").read())
        assert align in rec["inputs"].values(), name  # each method reads the round's aligned table
    assert list(summary["sections"]) == ["pt", "caf", "featloss"]
    assert [r["model"] for r in summary["sections"]["caf"]] == ["baseline", "caf"]
    assert [r["model"] for r in summary["sections"]["featloss"]] == ["none", "fixed"]
    assert summary["sections"]["pt"][0]["noise"] == 0.3
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["sections"] == json.loads(json.dumps(summary["sections"]))
    md = (tmp_path / "run" / "results.md").read_text()
    assert "## Progressive Teacher" in md and "## CAF" in md and "## Handcrafted feature losses" in md
    html = open(summary["report"]).read()
    assert 'id="results-pt"' in html and 'id="results-caf"' in html and 'id="results-featloss"' in html
    again = round_flow(cfg=cfg)  # a rerun reuses every stage and gives the same table
    assert again["sections"] == summary["sections"]
    assert {r["state"] for r in Run(cfg.out).status()} == {"reused"}


@pytest.mark.slow
def test_a_stage_refusing_its_data_is_one_clear_error_and_the_rerun_keeps_finished_stages(tmp_path, capsys):
    """No validation split for the feature losses' adaptive weighting: the command says so in one line
    (exit 2, the traceback in the run's log), and finished stages stay finished."""
    import yaml

    from flows.cli import main
    from flows.stage import Run

    data = {**TINY_DATA, "options": {**TINY_DATA["options"], "val_per_class": 0}}
    cfg = {"name": "noval", "out": str(tmp_path / "run"), "pipeline": "round", "methods": ["featloss"],
           "labeled": data, "align": {"size": 32},
           "featloss": {"variants": ["none", "adaptive"], "config": {"epochs": 1, "batch_size": 16, "device": "cpu"}}}
    path = tmp_path / "noval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["run", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs labeled validation rows" in err and "Fix that and rerun" in err
    assert "Traceback" not in err
    assert "Traceback" in (tmp_path / "run" / "logs" / "run.log").read_text()
    states = {r["stage"]: r["state"] for r in Run(cfg["out"]).status()}
    assert states["featloss.train-none"] == "finished" and states["featloss.train-adaptive"] == "failed"
