"""The experiment config: one YAML file drives a run, validated before anything starts.

Each section holds overrides of one stage's config dataclass; the dataclasses own the
defaults (and their docs), so there is one source of truth. ``fermine config --defaults``
prints every section with every default filled in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class ConfigError(ValueError):
    """The config file is invalid; the message names the key and what is allowed."""


class DataSource(BaseModel):
    """Where a data set comes from: the synthetic generator or a public data set on disk."""

    model_config = ConfigDict(extra="forbid")
    # A reader name (synthetic, rafdb, fer2013, ferplus, affectnet, afewva, ckplus, jaffe, folder, ms1m), or
    # "table": ROOT is a finished fermine image table (from `fermine ingest` / `fermine align`), used as is.
    format: str = "synthetic"
    root: str = ""  # data set folder or file (ignored for synthetic); the table's URI for "table"
    name: str | None = None  # a cross-data-set test set's name in the results (default: cross<i>)
    options: dict[str, Any] = Field(default_factory=dict)  # reader options, e.g. {size: 64, seed: 0}
    rows_per_shard: int = 512
    # Overrides of the run's `align` section for this source only, e.g. {detect: never} for
    # releases that ship aligned crops (MS1M 112 x 112, FER2013 48 x 48): no MTCNN pass over them.
    align: dict[str, Any] = Field(default_factory=dict)
    # A source with random access (ms1m with its .idx, folder, fer2013) is ingested in parts on the run's
    # Ray workers, which then read ROOT themselves; false reads it in the flow's process (ROOT only on the
    # machine that runs the flow). The table is the same either way.
    parallel: bool = True

    def ingest_config(self) -> dict[str, Any]:
        """What the ingest stage reads by (its identity and manifest): everything but the align overrides."""
        return self.model_dump(mode="json", exclude={"align", "name", "parallel"})


class RaySection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = None  # None: a local Ray instance; "auto" or "ray://head:10001" for a cluster
    num_cpus: int | None = None  # local instance only
    workers: int = 2  # actors per Ray stage
    gpus_per_worker: float = 0.0  # 0 = CPU actors and compute stages; 1 on a GPU cluster
    cpus_per_worker: float = 1.0  # per actor, and per compute stage
    memory_gb_per_worker: float | None = None  # memory a compute stage reserves (None: no reservation)
    # Compute stages (training, distillation, centroids, evaluation, CAM) run as Ray tasks with the
    # resources above, not in the flow's process; false keeps them in the flow's process.
    place_compute: bool = True
    # Independent chains of stages in flight at once at each fork of the DAG (0: as many as there are;
    # the cluster's resources bound what computes at once); 1 runs the round one stage at a time.
    max_parallel: int = Field(default=0, ge=0)
    # A stage asking for more than any node holds is refused at once (0), or after waiting this many seconds
    # for nodes to join (an autoscaling cluster whose GPU group starts at 0 nodes).
    wait_for_resources_s: float = Field(default=0.0, ge=0)
    log_to_driver: bool = False  # true: show Ray actors' own output (TensorFlow banners...) in the console


class RunConfig(BaseModel):
    """A full round: ingest -> align -> teacher -> PASM rounds -> mine -> distill -> retrain -> evaluate."""

    model_config = ConfigDict(extra="forbid")
    name: str = "round"
    out: str = "runs/round"  # run folder (any fsspec URI); stage outputs live under it
    seed: int = 0
    pipeline: Literal["round", "pasm", "omni", "pt", "caf", "featloss", "align", "evaluate"] = "round"
    # The methods a round runs, sharing its ingest, align and teacher (pipeline round only); None: the
    # pipeline's own (round: pasm and omni; pasm: pasm; omni: omni).
    methods: list[Literal["pasm", "omni", "pt", "caf", "featloss"]] | None = None
    model: str | None = None  # checkpoint folder evaluated by pipeline "evaluate"
    # A trained checkpoint used as the round's teacher (PASM's first teacher, omni's primitive learner)
    # instead of training one from the `teacher` section.
    teacher_checkpoint: str | None = None
    ray: RaySection = Field(default_factory=RaySection)
    labeled: DataSource = Field(default_factory=DataSource)  # train + test splits
    pool: DataSource | None = None  # unlabeled pool for mining; None = the labeled source's "pool" split
    #                                 (mine.splits, when set, names the splits mined instead)
    cross: list[DataSource] = Field(default_factory=list)  # cross-data-set test sets
    test_split: str = "test"
    # More splits of the labeled table, each evaluated as its own test set named after it (PASM Table
    # III: the synthetic generator's test_occlusion, test_pose30, test_pose45). A split a model's table
    # lacks is an error at evaluation.
    extra_test_splits: list[str] = Field(default_factory=list)
    # Per-stage overrides of the stage config dataclasses (see `fermine config --defaults`).
    align: dict[str, Any] = Field(default_factory=dict)
    teacher: dict[str, Any] = Field(default_factory=dict)
    attack: dict[str, Any] = Field(default_factory=dict)
    pasm: dict[str, Any] = Field(default_factory=dict)
    mine: dict[str, Any] = Field(default_factory=dict)
    distill: dict[str, Any] = Field(default_factory=dict)
    retrain: dict[str, Any] = Field(default_factory=dict)  # overrides of teacher settings for VAS/DAS
    # The method pipelines (flows/methods.py): each section holds its flow's options, `config` the
    # method's config dataclass fields (tasks.pt.method.PTConfig, tasks.caf.method.CAFConfig,
    # tasks.featloss.method.FeatLossConfig).
    pt: dict[str, Any] = Field(default_factory=dict)
    caf: dict[str, Any] = Field(default_factory=dict)
    featloss: dict[str, Any] = Field(default_factory=dict)
    report: bool = True

    def round_methods(self) -> list[str]:
        """The methods this run's round computes, in DAG order (ConfigError when ``methods`` does not apply)."""
        if self.methods is not None and self.pipeline != "round":
            raise ConfigError(f"methods: only pipeline round runs a list of methods (this run's pipeline is "
                              f"{self.pipeline!r}); drop `methods` or set pipeline: round")
        if self.methods is not None and not self.methods:
            raise ConfigError("methods: name at least one of pasm, omni, pt, caf, featloss")
        chosen = self.methods or {"round": ["pasm", "omni"], "pasm": ["pasm"], "omni": ["omni"]}.get(self.pipeline, [])
        return [m for m in METHOD_NAMES if m in chosen]


METHOD_NAMES = ("pasm", "omni", "pt", "caf", "featloss")  # a round's methods, in the order they run


def build_dataclass(cls: type, overrides: dict[str, Any], section: str) -> Any:
    """Validate ``overrides`` against a config dataclass: unknown keys and bad types are errors."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown setting(s) {unknown}; valid: {sorted(names)}")
    try:
        return TypeAdapter(cls).validate_python({**_defaults(cls), **overrides})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{section}.{loc}: {first['msg']} (got {first.get('input')!r})") from None


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _coerce(value: str) -> Any:
    """``--set`` values are YAML scalars: 3, 0.1, true, null, [a, b]."""
    return yaml.safe_load(value)


def apply_overrides(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (dotted keys for sections), got {item!r}")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = _coerce(value)
    return data


def load_config(path: str | Path | None, sets: list[str] | None = None) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must be a mapping of settings, got {type(data).__name__}")
    data = apply_overrides(data, sets or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise ConfigError(f"invalid config: {msgs}") from None


def packaged_config(name: str) -> Path:
    p = Path(__file__).parent / "configs" / f"{name}.yaml"
    if not p.exists():
        raise ConfigError(f"no packaged config {name!r}")
    return p


__all__ = ["METHOD_NAMES", "ConfigError", "DataSource", "RunConfig", "apply_overrides", "build_dataclass", "load_config",
           "packaged_config"]
