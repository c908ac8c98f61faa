"""The round as one Prefect flow: the run config's methods over one ingest, align and teacher.

ingest -> align -> teacher -> pasm: (attack -> erase -> student) x N [+ Table VII: random / adversarial
                                    erasing, PASM w/o teacher]
                           -> omni: centroids -> mine -> distill -> retrain (VAS, DAS)
                           -> evaluate (inner, extra test splits, cross)
              -> pt: noise -> fine-tune / Mean Teacher / PT -> evaluate    (on the aligned labeled table)
              -> caf: baseline / CAF -> evaluate                           (its valence/arousal labels)
              -> featloss: features -> a training per variant -> evaluate

``methods`` in the config picks them (default: pasm and omni); the PT, CAF and feature-loss stages are
the same ones their own pipelines run (flows/pt.py, flows/caf.py, flows/featloss.py), named
``pt.*``, ``caf.*`` and ``featloss.*`` here.

Every box is a stage (flows.prefect_tasks.stage): its output folder is named by its identity,
so rerunning the flow after a failure or a kill redoes only the unfinished stages.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable

import fsspec

from prefect import flow, get_run_logger

from flows import steps
from flows.config import ConfigError, DataSource, RunConfig, load_config
from flows.placement import placer_for
from flows.prefect_tasks import stage
from flows.results import ResultsTable, publish_artifacts, publish_results
from flows.stage import Run
from storage.artifact import join

log = logging.getLogger("fermine.round")


def _logger():
    try:
        return get_run_logger()
    except Exception:  # outside a flow run (direct call in tests)
        return log


class Round:
    """The stages of a round, each a method; flows pick which to chain."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run = Run(cfg.out, placer=placer_for(cfg.ray))
        with fsspec.open(join(self.run.root, "config.json"), "w") as f:
            f.write(cfg.model_dump_json(indent=2))  # the report and `fermine status` read it back
        self.results = ResultsTable()
        self.sections: dict[str, list[dict[str, Any]]] = {}  # method -> its results rows (PT, CAF, featloss)
        self._pools = threading.Lock()  # see pool_stage
        self.uris: dict[str, str] = {}
        self.figures: dict[str, str] = {}
        self.teacher_cfg = steps.train_config(cfg.teacher, cfg.seed, "teacher")
        self.retrain_cfg = steps.train_config({**cfg.teacher, **cfg.retrain}, cfg.seed, "retrain")

    # ---- orchestration --------------------------------------------------------------------------
    def pool_stage(self, name: str, config: Any, inputs: dict[str, str], fn: Callable[[str], Any]) -> Any:
        """A stage whose body drives a pool of Ray actors (align, attack, mine). One such stage at a time:
        two pools each holding part of the cluster while waiting for the rest would wait for each other
        forever; compute stages beside it only queue for what the pool leaves."""
        with self._pools:
            return stage(self.run, name, config, inputs, fn, ray=True)

    def parallel(self, *chains: Callable[[], Any]) -> list[Any]:
        """Run independent chains of stages at once and return their results in order.

        Threads only orchestrate: compute stages wait on Ray, which runs what the cluster's resources
        allow (on a 2-core laptop: two 1-CPU stages), so nothing is oversubscribed. ``ray.max_parallel``
        caps the chains in flight (1: sequential). Every chain runs to its end even when another fails
        (finished stages are kept for the rerun); the first failure is then raised.
        """
        limit = self.cfg.ray.max_parallel
        if len(chains) <= 1 or limit == 1:
            return [c() for c in chains]
        # Ray is started (or joined) here, in the flow's thread, before the chains need it: ray.init
        # from a worker thread cannot install its signal handlers.
        steps.connect_ray(self.cfg.ray)
        with ThreadPoolExecutor(max_workers=min(len(chains), limit or len(chains)), thread_name_prefix="chain") as ex:
            # Each thread gets a copy of this context: Prefect's flow run (its tasks' parent) included.
            futures = [ex.submit(contextvars.copy_context().run, c) for c in chains]
            return [f.result() for f in futures]

    # ---- data -------------------------------------------------------------------------------
    def data(self) -> None:
        c = self.cfg
        sources = [("", c.labeled)] + ([("-pool", c.pool)] if c.pool is not None else []) + [
            (f"-cross{i}", src) for i, src in enumerate(c.cross)]
        uris = self.parallel(*[lambda suffix=suffix, src=src: self._ingest_and_align(suffix, src)
                               for suffix, src in sources])
        for (suffix, _), uri in zip(sources, uris):
            self.uris[suffix.lstrip("-") or "labeled"] = uri
        self.uris.setdefault("pool", self.uris["labeled"])

    def _ingest_and_align(self, suffix: str, src: DataSource) -> str:
        """ingest{suffix} -> align{suffix}, the run's align settings with the source's own on top; a
        finished image table (format "table") is used as it is."""
        if src.format == steps.TABLE:
            return src.root
        raw = stage(self.run, f"ingest{suffix}", src.ingest_config(), {}, steps.ingest(src, self.cfg.ray))
        align_cfg = steps.align_config({**self.cfg.align, **src.align})
        return self.pool_stage(f"align{suffix}", align_cfg, {"images": raw.uri},
                               steps.align(align_cfg, raw.uri, self.cfg.ray)).uri

    def test_sets(self) -> dict[str, tuple[str, tuple[str, ...] | None]]:
        sets = {"inner": (self.uris["labeled"], (self.cfg.test_split,))}
        for split in self.cfg.extra_test_splits:
            sets[split.removeprefix("test_")] = (self.uris["labeled"], (split,))
        for i, src in enumerate(self.cfg.cross):
            sets[src.name or f"cross{i}"] = (self.uris[f"cross{i}"], None)
        return sets

    def evaluate(self, name: str, checkpoint_uri: str, section: str | None = None) -> dict[str, Any]:
        sets = self.test_sets()
        rec = stage(self.run, f"evaluate-{name}", {"sets": {k: [v[0].rsplit('/', 1)[-1], v[1]] for k, v in sets.items()}},
                    {"model": checkpoint_uri, **{k: v[0] for k, v in sets.items()}},
                    steps.evaluate(checkpoint_uri, sets), compute=True)
        metrics = steps.read_json(rec.uri, "metrics.json")
        self.results.add(name, metrics, section)
        _logger().info("%s: %s", name, self.results.summary(name))
        # The model's metrics per test set, in the UI as soon as it is evaluated (the run's table comes last).
        publish_artifacts(f"{self.cfg.name} {name}", [
            {"test set": ts, "accuracy": m.get("accuracy"), "mean class accuracy": m.get("mean_class_accuracy"),
             "n": m.get("n"), "checkpoint": checkpoint_uri} for ts, m in metrics.items() if isinstance(m, dict)],
            description=f"{self.cfg.name}: {name} evaluated")
        return metrics

    # ---- teacher and PASM -------------------------------------------------------------------
    def teacher(self) -> str:
        if self.cfg.teacher_checkpoint:  # a trained teacher given: evaluated, not retrained
            self.uris["teacher"] = self.cfg.teacher_checkpoint
            self.evaluate("teacher", self.cfg.teacher_checkpoint, "teacher")
            return self.cfg.teacher_checkpoint
        rec = stage(self.run, "teacher", self.teacher_cfg, {"train": self.uris["labeled"]},
                    steps.train(self.teacher_cfg, [self.uris["labeled"]]), compute=True)
        self.uris["teacher"] = rec.uri
        self.evaluate("teacher", rec.uri, "teacher")
        return rec.uri

    def pasm(self) -> None:
        """Algorithm 1's rounds, then Table VII's one-round conditions without teacher (PasmConfig.compare)."""
        c = self.cfg
        attack_cfg = steps.attack_config(c.attack, c.seed)
        pasm_cfg = steps.pasm_config(c.pasm, self.teacher_cfg, attack_cfg)
        def condition(cond: str) -> None:
            if cond == "no_erasing":
                self._no_erasing(pasm_cfg)
            else:
                self._table7(pasm_cfg, attack_cfg, cond)

        self.parallel(lambda: self._rounds(pasm_cfg, attack_cfg),
                      *[lambda cond=cond: condition(cond) for cond in pasm_cfg.compare])

    def _rounds(self, pasm_cfg: Any, attack_cfg: Any) -> None:
        """Algorithm 1: each round's student becomes the next round's teacher."""
        c = self.cfg
        labeled, teacher = self.uris["labeled"], self.uris["teacher"]
        row = "random-erasing-r{}" if pasm_cfg.random_erasing else "pasm-r{}"
        figure_rows: list[dict[str, str]] = []
        for r in range(1, pasm_cfg.rounds + 1):
            if pasm_cfg.random_erasing:  # the ablation: same region size, random positions, no attack
                erased = self._random_square(pasm_cfg, f"erase-random-r{r}", c.seed + r)
            else:
                erased = self._attack_and_erase(pasm_cfg, attack_cfg, teacher, r)
            st = self._student(f"student-r{r}", pasm_cfg, erased, teacher, seed=c.seed + r)
            self.evaluate(row.format(r), st.uri, "pasm")
            figure_rows.append({"round": str(r), "erased": erased})
            teacher = st.uri
        self.uris["pasm"] = teacher
        fig = stage(self.run, "figure-pasm", {"rows": len(figure_rows)},
                    {f"r{i}": row["erased"] for i, row in enumerate(figure_rows)},
                    steps.pasm_figure(figure_rows, labeled))
        self.figures["pasm"] = steps.first_png(fig.uri)

    def _student(self, name: str, pasm_cfg: Any, erased: str, teacher: str, seed: int) -> Any:
        """Algorithm 1 line 11 as a stage: a student of ``teacher`` on ``erased`` (Eq. 4, PASM's recipe)."""
        labeled = self.uris["labeled"]
        cfg = steps.student_config(self.teacher_cfg, pasm_cfg, seed=seed)
        return stage(self.run, name, {"train": cfg, "pasm": pasm_cfg},
                     {"erased": erased, "teacher": teacher, "images": labeled},
                     steps.student(cfg, pasm_cfg, erased, labeled, teacher), compute=True)

    def _no_erasing(self, pasm_cfg: Any) -> None:
        """The rounds' control: round 1's student, its recipe and seed, on the original images."""
        labeled = self.uris["labeled"]
        # The originals stand in for the erased table, once: student_data "both" would add them twice.
        control = replace(pasm_cfg, student_data="erased")
        st = self._student("student-no-erasing", control, labeled, self.uris["teacher"], seed=self.cfg.seed + 1)
        self.evaluate("pasm-no-erasing", st.uri, "pasm")

    def _attack_and_erase(self, pasm_cfg: Any, attack_cfg: Any, teacher: str, r: int) -> str:
        """Round r's new learning material: the point attack by this round's teacher, erased there."""
        labeled = self.uris["labeled"]
        att_cfg = steps.round_attack_config(attack_cfg, r)
        att = self.pool_stage(f"attack-r{r}", att_cfg, {"teacher": teacher, "images": labeled},
                              steps.attack(att_cfg, teacher, labeled, self.cfg.ray))
        erase_cfg = steps.erase_config(pasm_cfg, random_position=False, seed=self.cfg.seed + r)
        return stage(self.run, f"erase-r{r}", erase_cfg, {"images": labeled, "positions": att.uri},
                     steps.erase(erase_cfg, labeled, att.uri), compute=True).uri

    def _random_square(self, pasm_cfg: Any, name: str, seed: int) -> str:
        labeled = self.uris["labeled"]
        cfg = steps.erase_config(pasm_cfg, random_position=True, seed=seed)
        return stage(self.run, name, cfg, {"images": labeled}, steps.erase(cfg, labeled, None), compute=True).uri

    def _table7(self, pasm_cfg: Any, attack_cfg: Any, cond: str) -> None:
        """One condition of PASM Table VII: one round, no teacher guidance, the teacher's initialisation
        and recipe.

        The conditions differ only in the erased region: random (Zhong et al.), attention (Wei et al.)
        or the point attack's. PASM w/o teacher reuses round 1's attack and erased images (same stage
        identities), so it costs one training.
        """
        c, labeled, teacher = self.cfg, self.uris["labeled"], self.uris["teacher"]
        seed = c.seed + 1
        if cond == "random_erasing" and pasm_cfg.random_erasing_style == "online":
            tcfg = steps.baseline_config(self.teacher_cfg, seed, random_erasing=pasm_cfg.random_erasing_p)
            st = stage(self.run, "student-random-erasing", tcfg, {"train": labeled}, steps.train(tcfg, [labeled]),
                       compute=True)
            self.evaluate("random-erasing", st.uri, "pasm")
            return
        if cond == "random_erasing":
            erased = self._random_square(pasm_cfg, "erase-random", seed)
        elif cond == "adversarial_erasing":
            cam_cfg = steps.cam_config(self.teacher_cfg.train_splits)
            cam = stage(self.run, "cam", cam_cfg, {"teacher": teacher, "images": labeled},
                        steps.cam(cam_cfg, teacher, labeled), compute=True)
            ecfg = steps.erase_config(pasm_cfg, random_position=False, seed=seed)
            erased = stage(self.run, "erase-cam", ecfg, {"images": labeled, "positions": cam.uri},
                           steps.erase(ecfg, labeled, cam.uri), compute=True).uri
        else:  # no_teacher: round 1's learning material (the rounds' own stages, computed once)
            if pasm_cfg.no_teacher and not pasm_cfg.random_erasing:
                return  # the rounds themselves are PASM w/o teacher: round 1 is this row
            erased = self._attack_and_erase(pasm_cfg, attack_cfg, teacher, 1)
        scfg = steps.baseline_config(self.teacher_cfg, seed)
        name = cond.replace("_", "-")
        data = [erased] + ([labeled] if pasm_cfg.student_data == "both" else [])
        st = stage(self.run, f"student-{name}", scfg, {f"t{i}": u for i, u in enumerate(data)},
                   steps.train(scfg, data), compute=True)
        self.evaluate("pasm-no-teacher" if cond == "no_teacher" else name, st.uri, "pasm")

    # ---- omni-supervised mining and distillation ----------------------------------------------
    def omni(self) -> None:
        c = self.cfg
        primitive = self.uris["teacher"]
        cent_cfg = steps.centroid_config({"splits": list(self.teacher_cfg.train_splits)})
        cent = stage(self.run, "centroids", cent_cfg, {"model": primitive, "labeled": self.uris["labeled"]},
                     steps.centroids(cent_cfg, primitive, self.uris["labeled"]), compute=True)
        mine_cfg = steps.run_mine_config(c)
        aux = self.pool_stage("mine", mine_cfg, {"model": primitive, "centroids": cent.uri, "pool": self.uris["pool"]},
                              steps.mine(mine_cfg, primitive, cent.uri, self.uris["pool"], c.ray, self.test_sets()))
        self.figures["mined"] = steps.first_png(aux.uri)

        def das() -> None:
            dist_cfg = steps.run_distill_config(c, self.retrain_cfg)
            dis = stage(self.run, "distill", dist_cfg, {"aux": aux.uri}, steps.distill(dist_cfg, aux.uri), compute=True)
            self.uris["distill"] = dis.uri
            self.figures["distilled"] = steps.first_png(dis.uri)
            self._retrain("das", dis.uri)

        # Retraining with the mined faces does not wait for their distillation.
        self.parallel(lambda: self._retrain("vas", aux.uri), das)

    def _retrain(self, name: str, extra: str) -> None:
        rt = stage(self.run, f"retrain-{name}", self.retrain_cfg, {"labeled": self.uris["labeled"], "aux": extra},
                   steps.train(self.retrain_cfg, [self.uris["labeled"], extra]), compute=True)
        self.evaluate(name, rt.uri, "omni")

    # ---- the other papers' methods, on the run's aligned labeled table --------------------------
    def _method_base(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the section's flow options, the method config's overrides: the run's seed, the method's
        synthetic recipe on synthetic data, then the section's ``config``)."""
        from flows.methods import round_options, synthetic_recipe

        options = round_options(self.cfg, name)
        recipe = synthetic_recipe(name) if self.cfg.labeled.format == "synthetic" else {}
        return options, {"seed": self.cfg.seed, **recipe, **(options.get("config") or {})}

    def pt(self) -> None:
        """Progressive Teacher on the labeled table with injected label noise; the pool's mined splits
        are its unlabeled images."""
        from flows.config import build_dataclass
        from flows.pt import pretrain, pt_stages, records, synthetic_backbone
        from tasks.pt.method import PTConfig

        options, overrides = self._method_base("pt")
        overrides.setdefault("pool_splits", steps.run_mine_config(self.cfg).splits)
        cfg = build_dataclass(PTConfig, overrides, "pt.config")
        if self.cfg.labeled.format == "synthetic" and options.get("synthetic_pretrain", True) and not cfg.pretrained:
            # The paper starts from a pretrained backbone; here: one pretrained once on other synthetic faces.
            key = {"arch": cfg.arch, "size": cfg.input_size, "seed": cfg.seed}
            pre = stage(self.run, "pt.pretrain", key, {}, pretrain(cfg.input_size, cfg.arch, cfg.device, cfg.seed), compute=True)
            cfg = build_dataclass(PTConfig, {**overrides, "pretrained": synthetic_backbone(
                pre.uri, cfg.input_size, cfg.arch, device=cfg.device, seed=cfg.seed)}, "pt.config")
        rates = options.get("noise_rates")
        rows = pt_stages(self.run, cfg, self.uris["labeled"], self.uris["pool"], self.uris["labeled"],
                         [self.cfg.test_split], [0.0, 0.1, 0.2, 0.3] if rates is None else rates,
                         noise_kind=options.get("noise_kind", "symmetric"), noise_seed=options.get("noise_seed", 0),
                         compare=options.get("compare", True), prefix="pt.")
        self.sections["pt"] = records(rows)
        _logger().info("pt: %s", ", ".join(f"{r['model']} {r['noise']:g}: {r['accuracy']:.3f}" for r in self.sections["pt"]))

    def caf(self) -> None:
        """The critic-free baseline vs CAF on the labeled table's valence/arousal labels."""
        from flows.caf import caf_stages, results_records
        from flows.config import build_dataclass
        from tasks.caf.method import CAFConfig

        options, overrides = self._method_base("caf")
        cfg = build_dataclass(CAFConfig, overrides, "caf.config")
        rows = caf_stages(self.run, cfg, self.uris["labeled"], self.uris["labeled"], [self.cfg.test_split],
                          compare=options.get("compare", True), prefix="caf.")
        self.sections["caf"] = results_records(rows)
        self.figures.update({f"caf-{k}": v["scatter_png"] for k, v in rows.items()})
        _logger().info("caf: %s", ", ".join(f"{k} CCC V {v['ccc_v']:.3f} A {v['ccc_a']:.3f}" for k, v in rows.items()))

    def featloss(self) -> None:
        """The feature-loss variants on the labeled table (its val split drives adaptive weighting)."""
        from flows.featloss import featloss_configs, featloss_stages

        options, overrides = self._method_base("featloss")
        _, cfgs, hcfg = featloss_configs(overrides, options.get("variants"), options.get("features_config"))
        results, _ = featloss_stages(self.run, cfgs, hcfg, self.uris["labeled"], self.uris["labeled"],
                                     [self.cfg.test_split], prefix="featloss.")
        self.sections["featloss"] = results.records()
        _logger().info("featloss: %s", ", ".join(f"{k} {results.summary(k)}" for k in results.rows))

    def model_order(self) -> list[str]:
        """The results table's rows in DAG order, whichever chain finished first."""
        pasm = steps.pasm_config(self.cfg.pasm, self.teacher_cfg, steps.attack_config(self.cfg.attack, self.cfg.seed))
        row = "random-erasing-r{}" if pasm.random_erasing else "pasm-r{}"
        conditions = {"random_erasing": "random-erasing", "adversarial_erasing": "adversarial-erasing",
                      "no_teacher": "pasm-no-teacher", "no_erasing": "pasm-no-erasing"}
        return (["teacher", "model"] + [row.format(r) for r in range(1, pasm.rounds + 1)]
                + [conditions[c] for c in pasm.compare] + ["vas", "das"])

    def finish(self) -> dict[str, Any]:
        self.results.reorder(self.model_order())
        sections = {m: self.results.records(section=m) for m in ("pasm", "omni") if m in self.results.sections()}
        sections.update({m: self.sections[m] for m in ("pt", "caf", "featloss") if m in self.sections})
        return publish_results(self.run, self.cfg, self.results, self.figures, self.uris, sections=sections)

    def methods(self) -> None:
        """The config's methods at once: PASM and omni after their shared teacher, the others beside it."""
        chosen = self.cfg.round_methods()
        self.data()
        on_teacher = [m for m in chosen if m in ("pasm", "omni")]

        def teacher_chain() -> None:
            self.teacher()
            self.parallel(*[getattr(self, m) for m in on_teacher])

        self.parallel(*([teacher_chain] if on_teacher else []),
                      *[getattr(self, m) for m in chosen if m not in on_teacher])


def _load(config_path: str | None, overrides: list[str] | None, cfg: RunConfig | None) -> RunConfig:
    return cfg if cfg is not None else load_config(config_path, overrides or [])


def _methods(config_path: str | None, overrides: list[str] | None, cfg: RunConfig | None) -> dict[str, Any]:
    r = Round(_load(config_path, overrides, cfg))
    r.methods()
    return r.finish()


# round, pasm and omni are one DAG: the config's `pipeline` picks its default methods (RunConfig.round_methods);
# they stay three flows so each deployment has its own name in Prefect.
@flow(name="fermine-round", log_prints=True)
def round_flow(config_path: str | None = None, overrides: list[str] | None = None, cfg: RunConfig | None = None) -> dict[str, Any]:
    """The config's methods (default: PASM and omni) over one ingest -> align -> teacher."""
    return _methods(config_path, overrides, cfg)


@flow(name="fermine-pasm", log_prints=True)
def pasm_flow(config_path: str | None = None, overrides: list[str] | None = None, cfg: RunConfig | None = None) -> dict[str, Any]:
    """teacher -> (attack -> erase -> student) x N, with Table VII's conditions."""
    return _methods(config_path, overrides, cfg)


@flow(name="fermine-omni", log_prints=True)
def omni_flow(config_path: str | None = None, overrides: list[str] | None = None, cfg: RunConfig | None = None) -> dict[str, Any]:
    """primitive model -> centroids -> mine -> distill -> retrain with VAS and DAS -> evaluate."""
    return _methods(config_path, overrides, cfg)


@flow(name="fermine-align", log_prints=True)
def align_flow(config_path: str | None = None, overrides: list[str] | None = None, cfg: RunConfig | None = None) -> dict[str, Any]:
    """ingest -> align for the labeled set, the pool and the cross-data-set tests (no training)."""
    r = Round(_load(config_path, overrides, cfg))
    r.data()
    return r.finish()


@flow(name="fermine-evaluate", log_prints=True)
def evaluate_flow(config_path: str | None = None, overrides: list[str] | None = None, cfg: RunConfig | None = None) -> dict[str, Any]:
    """ingest -> align -> evaluate the config's ``model`` checkpoint on the inner and cross test sets."""
    r = Round(_load(config_path, overrides, cfg))
    if not r.cfg.model:
        raise ConfigError("pipeline 'evaluate' needs `model`: a checkpoint folder (--set model=PATH)")
    r.data()
    r.evaluate("model", r.cfg.model)
    return r.finish()


FLOWS = {"round": round_flow, "pasm": pasm_flow, "omni": omni_flow, "align": align_flow, "evaluate": evaluate_flow}

from flows.methods import PIPELINES  # noqa: E402  (pt, caf, featloss: flows/methods.py)

FLOWS.update(PIPELINES)

__all__ = ["FLOWS", "Round", "align_flow", "evaluate_flow", "omni_flow", "pasm_flow", "round_flow"]
