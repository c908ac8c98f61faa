"""PT, CAF and the feature losses as pipelines of the run config (flows/methods.py)."""

import json

import pytest

from flows.config import ConfigError, RunConfig, packaged_config, load_config
from flows.steps import resolve_configs


@pytest.mark.parametrize("name", ["pt", "caf", "featloss"])
def test_each_method_config_validates_and_names_its_mistakes(name):
    cfg = load_config(str(packaged_config(name)))
    assert cfg.pipeline == name and name in resolve_configs(cfg, check_paths=False)
    for bad, msg in (({"nosuch": 1}, "unknown setting"), ({"config": {"lr": "fast"}}, r"config\.lr"),
                     ({"config": {"epoch": 3}}, r"unknown setting\(s\) \['epoch'\]")):
        with pytest.raises(ConfigError, match=msg):
            resolve_configs(RunConfig.model_validate({"pipeline": name, name: bad}), check_paths=False)


@pytest.mark.slow
def test_fermine_run_trains_the_caf_comparison_and_reuses_it(tmp_path, capsys):
    from flows.cli import main

    out = str(tmp_path / "caf")
    argv = ["run", str(packaged_config("caf")), "--set", f"out={out}",
            "--set", "caf.synthetic_options={train_per_class: 8, test_per_class: 4}",
            "--set", "caf.config={epochs: 1, input_size: 32, batch_size: 16, device: cpu}"]
    main(argv)
    printed = capsys.readouterr()
    assert "baseline" in printed.out and "caf" in printed.out and "done    train-caf" in printed.err
    result = json.loads((tmp_path / "caf" / "results.json").read_text())
    assert set(result["rows"]) == {"baseline", "caf"}
    main(argv)  # a rerun reuses every stage
    assert "done " not in capsys.readouterr().err
