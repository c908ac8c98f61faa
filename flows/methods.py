"""Progressive Teacher, CAF and the feature losses as pipelines of the run config.

``pipeline: pt | caf | featloss`` runs that method's flow (flows/pt.py, flows/caf.py, flows/featloss.py)
with the options of the config's section of the same name, into the run folder ``out``:

    pipeline: caf
    out: runs/caf
    caf: {compare: true, config: {epochs: 8}}       # flows.caf.caf_flow's options; `config`: CAFConfig

A section's keys are its flow's parameters (declared once, in the flow's signature) and are validated
from that signature; its ``config`` is validated against the method's config dataclass, so a typo fails
before any work starts. The deployments of deploy/prefect.yaml run these with ``config_path`` +
``overrides``, like the round.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable

from prefect import flow
from pydantic import ConfigDict, ValidationError, create_model

from flows.config import ConfigError, RunConfig, build_dataclass, load_config

# pipeline -> (the flow's module and name, the method config dataclass's module and name)
METHODS: dict[str, tuple[str, str, str, str]] = {
    "pt": ("flows.pt", "pt_flow", "tasks.pt.method", "PTConfig"),
    "caf": ("flows.caf", "caf_flow", "tasks.caf.method", "CAFConfig"),
    "featloss": ("flows.featloss", "featloss_flow", "tasks.featloss.method", "FeatLossConfig"),
}


def _resolve(name: str) -> tuple[Callable[..., Any], type]:
    import importlib

    fmod, fname, cmod, cname = METHODS[name]
    return getattr(importlib.import_module(fmod), fname), getattr(importlib.import_module(cmod), cname)


def method_options(cfg: RunConfig, name: str) -> dict[str, Any]:
    """The validated keyword arguments of method ``name``'s flow from the config's section (ConfigError)."""
    fl, config_cls = _resolve(name)
    hints = typing.get_type_hints(fl.fn)
    params = {k: p for k, p in inspect.signature(fl.fn).parameters.items() if k != "out"}
    options = dict(getattr(cfg, name))
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(f"{name}: unknown setting(s) {unknown}; valid: {sorted(params)}")
    model = create_model(f"{name}_options", __config__=ConfigDict(arbitrary_types_allowed=True),
                         **{k: (hints.get(k, Any), p.default if p.default is not inspect.Parameter.empty else ...)
                            for k, p in params.items() if k in options})
    try:
        model.model_validate(options)
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"{name}.{'.'.join(str(x) for x in first['loc'])}: {first['msg']} "
                          f"(got {first.get('input')!r})") from None
    build_dataclass(config_cls, options.get("config") or {}, f"{name}.config")  # raises on a bad field
    return options


# The options that name a method pipeline's own data: in a round, every method uses the run's tables.
DATA_OPTIONS: dict[str, tuple[str, ...]] = {
    "pt": ("labeled_uri", "pool_uri", "test_uri", "test_splits", "val_uri", "synthetic_options"),
    "caf": ("train_uri", "test_uri", "test_splits", "synthetic_options"),
    "featloss": ("table_uri", "test_uri", "test_splits", "synthetic", "report"),
}
# The method config modules whose SYNTHETIC_RECIPE applies on synthetic data.
_RECIPES = {"pt": "flows.pt", "caf": "tasks.caf.method", "featloss": "tasks.featloss.method"}


def round_options(cfg: RunConfig, name: str) -> dict[str, Any]:
    """Method ``name``'s validated options for a round (ConfigError): its data options are refused, the
    round's tables (ingested and aligned once) are what every method trains and tests on."""
    options = method_options(cfg, name)
    own = sorted(set(options) & set(DATA_OPTIONS[name]))
    if own:
        raise ConfigError(f"{name}: {own} name data of its own, but in a round (methods: [...]) {name} uses the "
                          f"run's `labeled` source (and `pool`, `test_split`); drop them, or run it alone with "
                          f"pipeline: {name}")
    return options


def synthetic_recipe(name: str) -> dict[str, Any]:
    """Method ``name``'s recipe for the embedded synthetic data (its SYNTHETIC_RECIPE)."""
    import importlib

    return dict(importlib.import_module(_RECIPES[name]).SYNTHETIC_RECIPE)


def method_defaults(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Section ``name`` with every default filled in (for `fermine config --defaults`): the flow's
    parameters, and under ``config`` the method config's fields. On synthetic data the flows use the
    method's SYNTHETIC_RECIPE for the config fields a section does not give."""
    fl, config_cls = _resolve(name)
    out = {k: p.default for k, p in inspect.signature(fl.fn).parameters.items()
           if k != "out" and p.default is not inspect.Parameter.empty}
    out.update(options or {})
    out["config"] = {**config_cls().to_dict(), **((options or {}).get("config") or {})}
    return out


def _records(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One results-table row per model, whatever the flow's own result layout."""
    if name == "pt":
        from flows.pt import records

        return records(result["rows"])
    if name == "caf":
        from flows.caf import results_records

        return results_records(result["rows"])
    return list(result.get("results", []))


def _pipeline(name: str, cfg: RunConfig) -> dict[str, Any]:
    fl, _ = _resolve(name)
    options = method_options(cfg, name)
    cfg.round_methods()  # `methods` is for pipeline round: refused here with a message
    result = fl(out=cfg.out, **options)
    records = _records(name, result)
    return {**result, "name": cfg.name, "run": cfg.out, "results": records, "sections": {name: records},
            "report": result.get("report")}


def _load(config_path: str | None, overrides: list[str] | None, cfg: RunConfig | None) -> RunConfig:
    return cfg if cfg is not None else load_config(config_path, overrides or [])


@flow(name="fermine-pt", log_prints=True)
def pt_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                cfg: RunConfig | None = None) -> dict[str, Any]:
    """Fine-tune vs Mean Teacher vs Progressive Teacher (the config's `pt` section)."""
    return _pipeline("pt", _load(config_path, overrides, cfg))


@flow(name="fermine-caf", log_prints=True)
def caf_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                 cfg: RunConfig | None = None) -> dict[str, Any]:
    """The critic-free baseline vs CAF on valence/arousal (the config's `caf` section)."""
    return _pipeline("caf", _load(config_path, overrides, cfg))


@flow(name="fermine-featloss", log_prints=True)
def featloss_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                      cfg: RunConfig | None = None) -> dict[str, Any]:
    """No feature loss vs fixed vs adaptive weighting (the config's `featloss` section)."""
    return _pipeline("featloss", _load(config_path, overrides, cfg))


PIPELINES = {"pt": pt_pipeline, "caf": caf_pipeline, "featloss": featloss_pipeline}
