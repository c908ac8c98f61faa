"""The full round as one Prefect flow, plus the PASM-only and omni-only flows built from it.

ingest -> align -> teacher -> (attack -> erase -> student) x N [+ Table VII: random / adversarial erasing,
       PASM w/o teacher]
       -> centroids -> mine -> distill -> retrain (VAS, DAS) -> evaluate (inner + cross)

Every box is a stage (flows.prefect_tasks.stage): its output folder is named by its identity,
so rerunning the flow after a failure or a kill redoes only the unfinished stages.
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec

from prefect import flow, get_run_logger

from flows import steps
from flows.config import ConfigError, DataSource, RunConfig, load_config
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
        self.run = Run(cfg.out)
        with fsspec.open(join(self.run.root, "config.json"), "w") as f:
            f.write(cfg.model_dump_json(indent=2))  # the report and `fermine status` read it back
        self.results = ResultsTable()
        self.uris: dict[str, str] = {}
        self.figures: dict[str, str] = {}
        self.teacher_cfg = steps.train_config(cfg.teacher, cfg.seed, "teacher")
        self.retrain_cfg = steps.train_config({**cfg.teacher, **cfg.retrain}, cfg.seed, "retrain")

    # ---- data -------------------------------------------------------------------------------
    def data(self) -> None:
        c = self.cfg
        self.uris["labeled"] = self.uris["pool"] = self._ingest_and_align("", c.labeled)
        if c.pool is not None:
            self.uris["pool"] = self._ingest_and_align("-pool", c.pool)
        for i, src in enumerate(c.cross):
            self.uris[f"cross{i}"] = self._ingest_and_align(f"-cross{i}", src)

    def _ingest_and_align(self, suffix: str, src: DataSource) -> str:
        """ingest{suffix} -> align{suffix}, the run's align settings with the source's own on top."""
        raw = stage(self.run, f"ingest{suffix}", src.ingest_config(), {}, steps.ingest(src))
        align_cfg = steps.align_config({**self.cfg.align, **src.align})
        return stage(self.run, f"align{suffix}", align_cfg, {"images": raw.uri},
                     steps.align(align_cfg, raw.uri, self.cfg.ray), ray=True).uri

    def test_sets(self) -> dict[str, tuple[str, tuple[str, ...] | None]]:
        sets = {"inner": (self.uris["labeled"], (self.cfg.test_split,))}
        for split in self.cfg.extra_test_splits:
            sets[split.removeprefix("test_")] = (self.uris["labeled"], (split,))
        for i in range(len(self.cfg.cross)):
            sets[f"cross{i}"] = (self.uris[f"cross{i}"], None)
        return sets

    def evaluate(self, name: str, checkpoint_uri: str) -> dict[str, Any]:
        sets = self.test_sets()
        rec = stage(self.run, f"evaluate-{name}", {"sets": {k: [v[0].rsplit('/', 1)[-1], v[1]] for k, v in sets.items()}},
                    {"model": checkpoint_uri, **{k: v[0] for k, v in sets.items()}},
                    steps.evaluate(checkpoint_uri, sets))
        metrics = steps.read_json(rec.uri, "metrics.json")
        self.results.add(name, metrics)
        _logger().info("%s: %s", name, self.results.summary(name))
        # The model's metrics per test set, in the UI as soon as it is evaluated (the run's table comes last).
        publish_artifacts(f"{self.cfg.name} {name}", [
            {"test set": ts, "accuracy": m.get("accuracy"), "mean class accuracy": m.get("mean_class_accuracy"),
             "n": m.get("n"), "checkpoint": checkpoint_uri} for ts, m in metrics.items() if isinstance(m, dict)],
            description=f"{self.cfg.name}: {name} evaluated")
        return metrics

    # ---- teacher and PASM -------------------------------------------------------------------
    def teacher(self) -> str:
        rec = stage(self.run, "teacher", self.teacher_cfg, {"train": self.uris["labeled"]},
                    steps.train(self.teacher_cfg, [self.uris["labeled"]]))
        self.uris["teacher"] = rec.uri
        self.evaluate("teacher", rec.uri)
        return rec.uri

    def pasm(self) -> None:
        """Algorithm 1's rounds, then Table VII's one-round conditions without teacher (PasmConfig.compare)."""
        c = self.cfg
        attack_cfg = steps.attack_config(c.attack, c.seed)
        pasm_cfg = steps.pasm_config(c.pasm, self.teacher_cfg, attack_cfg)
        labeled, teacher = self.uris["labeled"], self.uris["teacher"]
        row = "random-erasing-r{}" if pasm_cfg.random_erasing else "pasm-r{}"
        figure_rows: list[dict[str, str]] = []
        for r in range(1, pasm_cfg.rounds + 1):
            if pasm_cfg.random_erasing:  # the ablation: same region size, random positions, no attack
                erased = self._random_square(pasm_cfg, f"erase-random-r{r}", c.seed + r)
            else:
                erased = self._attack_and_erase(pasm_cfg, attack_cfg, teacher, r)
            student_cfg = steps.student_config(self.teacher_cfg, pasm_cfg, seed=c.seed + r)
            st = stage(self.run, f"student-r{r}", {"train": student_cfg, "pasm": pasm_cfg},
                       {"erased": erased, "teacher": teacher, "images": labeled},
                       steps.student(student_cfg, pasm_cfg, erased, labeled, teacher))
            self.evaluate(row.format(r), st.uri)
            figure_rows.append({"round": str(r), "erased": erased})
            teacher = st.uri
        self.uris["pasm"] = teacher
        self._table7(pasm_cfg, attack_cfg)
        fig = stage(self.run, "figure-pasm", {"rows": len(figure_rows)},
                    {f"r{i}": row["erased"] for i, row in enumerate(figure_rows)},
                    steps.pasm_figure(figure_rows, labeled))
        self.figures["pasm"] = steps.first_png(fig.uri)

    def _attack_and_erase(self, pasm_cfg: Any, attack_cfg: Any, teacher: str, r: int) -> str:
        """Round r's new learning material: the point attack by this round's teacher, erased there."""
        labeled = self.uris["labeled"]
        att_cfg = steps.round_attack_config(attack_cfg, r)
        att = stage(self.run, f"attack-r{r}", att_cfg, {"teacher": teacher, "images": labeled},
                    steps.attack(att_cfg, teacher, labeled, self.cfg.ray), ray=True)
        erase_cfg = steps.erase_config(pasm_cfg, random_position=False, seed=self.cfg.seed + r)
        return stage(self.run, f"erase-r{r}", erase_cfg, {"images": labeled, "positions": att.uri},
                     steps.erase(erase_cfg, labeled, att.uri)).uri

    def _random_square(self, pasm_cfg: Any, name: str, seed: int) -> str:
        labeled = self.uris["labeled"]
        cfg = steps.erase_config(pasm_cfg, random_position=True, seed=seed)
        return stage(self.run, name, cfg, {"images": labeled}, steps.erase(cfg, labeled, None)).uri

    def _table7(self, pasm_cfg: Any, attack_cfg: Any) -> None:
        """PASM Table VII: one round, no teacher guidance, the teacher's initialisation and recipe.

        The conditions differ only in the erased region: random (Zhong et al.), attention (Wei et al.)
        or the point attack's. PASM w/o teacher reuses round 1's attack and erased images (same stage
        identities), so it costs one training.
        """
        c, labeled, teacher = self.cfg, self.uris["labeled"], self.uris["teacher"]
        seed = c.seed + 1
        for cond in pasm_cfg.compare:
            if cond == "random_erasing" and pasm_cfg.random_erasing_style == "online":
                tcfg = steps.baseline_config(self.teacher_cfg, seed, random_erasing=pasm_cfg.random_erasing_p)
                st = stage(self.run, "student-random-erasing", tcfg, {"train": labeled}, steps.train(tcfg, [labeled]))
                self.evaluate("random-erasing", st.uri)
                continue
            if cond == "random_erasing":
                erased = self._random_square(pasm_cfg, "erase-random", seed)
            elif cond == "adversarial_erasing":
                cam_cfg = steps.cam_config(self.teacher_cfg.train_splits)
                cam = stage(self.run, "cam", cam_cfg, {"teacher": teacher, "images": labeled},
                            steps.cam(cam_cfg, teacher, labeled))
                ecfg = steps.erase_config(pasm_cfg, random_position=False, seed=seed)
                erased = stage(self.run, "erase-cam", ecfg, {"images": labeled, "positions": cam.uri},
                               steps.erase(ecfg, labeled, cam.uri)).uri
            else:  # no_teacher: round 1's learning material, already made unless the rounds erase at random
                if pasm_cfg.no_teacher and not pasm_cfg.random_erasing:
                    continue  # the rounds themselves are PASM w/o teacher: round 1 is this row
                erased = self._attack_and_erase(pasm_cfg, attack_cfg, teacher, 1)
            scfg = steps.baseline_config(self.teacher_cfg, seed)
            name = cond.replace("_", "-")
            data = [erased] + ([labeled] if pasm_cfg.student_data == "both" else [])
            st = stage(self.run, f"student-{name}", scfg, {f"t{i}": u for i, u in enumerate(data)},
                       steps.train(scfg, data))
            self.evaluate("pasm-no-teacher" if cond == "no_teacher" else name, st.uri)

    # ---- omni-supervised mining and distillation ----------------------------------------------
    def omni(self) -> None:
        c = self.cfg
        primitive = self.uris["teacher"]
        cent_cfg = steps.centroid_config({"splits": list(self.teacher_cfg.train_splits)})
        cent = stage(self.run, "centroids", cent_cfg, {"model": primitive, "labeled": self.uris["labeled"]},
                     steps.centroids(cent_cfg, primitive, self.uris["labeled"]))
        mine_cfg = steps.run_mine_config(c)
        aux = stage(self.run, "mine", mine_cfg, {"model": primitive, "centroids": cent.uri, "pool": self.uris["pool"]},
                    steps.mine(mine_cfg, primitive, cent.uri, self.uris["pool"], c.ray, self.test_sets()), ray=True)
        self.figures["mined"] = steps.first_png(aux.uri)
        dist_cfg = steps.run_distill_config(c, self.retrain_cfg)
        dis = stage(self.run, "distill", dist_cfg, {"aux": aux.uri}, steps.distill(dist_cfg, aux.uri))
        self.uris["distill"] = dis.uri
        self.figures["distilled"] = steps.first_png(dis.uri)
        for name, extra in (("vas", aux.uri), ("das", dis.uri)):
            rt = stage(self.run, f"retrain-{name}", self.retrain_cfg, {"labeled": self.uris["labeled"], "aux": extra},
                       steps.train(self.retrain_cfg, [self.uris["labeled"], extra]))
            self.evaluate(name, rt.uri)

    def finish(self) -> dict[str, Any]:
        summary = publish_results(self.run, self.cfg, self.results, self.figures, self.uris)
        return summary


def _load(config_path: str | None, overrides: list[str] | None, cfg: RunConfig | None) -> RunConfig:
    return cfg if cfg is not None else load_config(config_path, overrides or [])


@flow(name="fermine-round", log_prints=True)
def round_flow(config_path: str | None = None, overrides: list[str] | None = None, cfg: RunConfig | None = None) -> dict[str, Any]:
    """The full round: ingest -> align -> teacher -> PASM -> mine -> distill -> retrain -> evaluate."""
    r = Round(_load(config_path, overrides, cfg))
    r.data()
    r.teacher()
    r.pasm()
    r.omni()
    return r.finish()


@flow(name="fermine-pasm", log_prints=True)
def pasm_flow(config_path: str | None = None, overrides: list[str] | None = None, cfg: RunConfig | None = None) -> dict[str, Any]:
    """teacher -> (attack -> erase -> student) x N, with the random-erasing ablation."""
    r = Round(_load(config_path, overrides, cfg))
    r.data()
    r.teacher()
    r.pasm()
    return r.finish()


@flow(name="fermine-omni", log_prints=True)
def omni_flow(config_path: str | None = None, overrides: list[str] | None = None, cfg: RunConfig | None = None) -> dict[str, Any]:
    """primitive model -> centroids -> mine -> distill -> retrain with VAS and DAS -> evaluate."""
    r = Round(_load(config_path, overrides, cfg))
    r.data()
    r.teacher()
    r.omni()
    return r.finish()


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
