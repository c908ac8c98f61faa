"""PASM, Algorithm 1: teacher -> (point attack -> erase -> student with Eq. 4) x N rounds.

Round r: the teacher (the trained network for r = 1, the previous student after that) attacks every
training image (tasks.pasm.attack), an s x s region is erased at the found position (tasks.pasm.erase), and a
student of the same architecture is trained on the erased images with
``alpha * CE + beta * MSE(student logits, teacher logits)`` (Eq. 4, tasks.train); it becomes the next
round's teacher.

What the paper leaves open, and the choices here (both switchable):
* student initialisation: Algorithm 1 says "refine a student network" (Fig. 2: "network refinement");
  default ``student_init="teacher"`` starts the student from the teacher's weights; "scratch" starts it
  like the first teacher (fresh, or ``train.pretrained``), which Table VI's VGG student must have done.
* training data: Eq. 4 and Algorithm 1 line 11 use the new samples x'_i only: default
  ``student_data="erased"``; "both" adds the original images.

Ablations (Section IV-D): ``random_erasing`` (the rounds erase at random positions, same region
size), ``no_teacher`` ("PASM w/o teacher": no Eq. 4 MSE term, and the student starts where the teacher
started, not from its weights), the region size (``erase.size``), beta, rounds. ``compare`` names Table
VII's conditions, trained by the pipeline (flows/round.py) next to the rounds, each for ONE round,
WITHOUT teacher guidance and from the teacher's initialisation with the teacher's recipe, so they differ
from each other only in the region erased:

* ``random_erasing``: Zhong et al.'s online random erasing (per batch, probability ``random_erasing_p``,
  random area and aspect ratio, random fill: TrainConfig.random_erasing); ``random_erasing_style:
  square`` erases instead one square of the PASM region size once, offline, at a random position;
* ``adversarial_erasing``: Wei et al.'s attention erasing, at the Grad-CAM peak (tasks.pasm.cam);
* ``no_teacher``: PASM's erased images (the first round's attack), CE only.

Every step writes its own artifact/checkpoint under ``out_uri`` and is skipped when already finished,
so a rerun after a crash continues where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import fsspec

from storage.artifact import Artifact, is_finished, join
from tasks.pasm.attack import AttackConfig, attack_table
from tasks.pasm.erase import EraseConfig, erase_table
from tasks.train import TrainConfig

STUDENT_INITS = ("teacher", "scratch")
COMPARISONS = ("random_erasing", "adversarial_erasing", "no_teacher")
RANDOM_ERASING_STYLES = ("online", "square")
STUDENT_DATA = ("erased", "both")
CONFIG_FILE = "pasm.json"
SUMMARY_FILE = "summary.json"
FIGURE_FILE = "erased_samples.png"

AttackStage = Callable[[str, str, str, AttackConfig], Any]  # (teacher ckpt, table, out, cfg) -> anything
Progress = Callable[[dict], None]


@dataclass(frozen=True)
class PasmConfig:
    """A PASM run. Defaults: the paper's alpha = 1, beta = 0.1, one round, region 0.14 of the side (31 px at 224)."""

    rounds: int = 1
    alpha: float = 1.0  # Eq. 4 CE weight
    beta: float = 0.1  # Eq. 4 MSE weight, from {0.5, 0.1, 0.01} in Fig. 8
    train: TrainConfig = field(default_factory=TrainConfig)  # teacher and student recipe (arch, size, epochs)
    attack: AttackConfig = field(default_factory=AttackConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    student_epochs: int | None = None  # None = train.epochs
    student_init: str = "teacher"  # "teacher": refine the teacher's weights | "scratch": like the first teacher
    student_data: str = "erased"  # "erased": x' only (Eq. 4) | "both": originals + erased
    random_erasing: bool = False  # ablation: the rounds erase at random positions instead of the attacked ones
    no_teacher: bool = False  # ablation: "PASM w/o teacher" (CE only, beta = 0, the teacher's initialisation)
    compare: tuple[str, ...] = COMPARISONS  # Table VII's conditions trained beside the rounds (see above)
    random_erasing_style: str = "online"  # "online": Zhong et al. | "square": one offline square, PASM's size
    random_erasing_p: float = 0.5  # Zhong et al.'s erasing probability (online style)
    test_splits: tuple[str, ...] = ("test",)
    figure_samples: int = 8

    def validate(self) -> "PasmConfig":
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError("alpha and beta must be >= 0")
        if self.student_init not in STUDENT_INITS:
            raise ValueError(f"student_init must be one of {STUDENT_INITS}, got {self.student_init!r}")
        if self.student_data not in STUDENT_DATA:
            raise ValueError(f"student_data must be one of {STUDENT_DATA}, got {self.student_data!r}")
        bad = sorted(set(self.compare) - set(COMPARISONS))
        if bad:
            raise ValueError(f"compare: unknown condition(s) {bad}; choose from {list(COMPARISONS)}")
        if self.random_erasing_style not in RANDOM_ERASING_STYLES:
            raise ValueError(f"random_erasing_style must be one of {RANDOM_ERASING_STYLES}, "
                             f"got {self.random_erasing_style!r}")
        if not 0 < self.random_erasing_p <= 1:
            raise ValueError(f"random_erasing_p is a probability in (0, 1], got {self.random_erasing_p}")
        if self.student_epochs is not None and self.student_epochs < 1:
            raise ValueError("student_epochs must be >= 1")
        self.attack.validate()
        self.erase.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return json.loads(json.dumps(d, default=list))

    @property
    def uses_teacher(self) -> bool:
        return not self.no_teacher and self.beta > 0

    @property
    def student_from_teacher(self) -> bool:
        """Whether a round's student starts from its teacher's weights ("refine", Algorithm 1)."""
        return self.student_init == "teacher" and not self.no_teacher


@dataclass
class RoundResult:
    round: int
    teacher_uri: str
    student_uri: str
    erased_uri: str
    positions_uri: str | None
    accuracy: float
    mean_class_accuracy: float
    attack: dict[str, Any] = field(default_factory=dict)  # mean fitness, clean prob, evals, rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PasmResult:
    out_uri: str
    teacher_uri: str
    teacher_accuracy: float
    teacher_mean_class_accuracy: float
    rounds: list[RoundResult]
    figure: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounds"] = [r.to_dict() for r in self.rounds]
        return d


def _fs(uri: str):
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def _write_json(uri: str, obj: Any) -> None:
    from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

    atomic_write_bytes(uri, dumps_json(obj).encode())


def _read_json(uri: str) -> Any | None:
    fs, path = _fs(uri)
    return json.loads(fs.cat_file(path).decode()) if fs.exists(path) else None


def _emit(progress: Progress | None, **event: Any) -> None:
    if progress is not None:
        progress(event)


def _evaluate(ckpt: str, test_uri: str, splits: tuple[str, ...], cache_uri: str) -> dict[str, Any]:
    """Test metrics of a checkpoint, cached next to it (keyed by the weights' checksum and the test table)."""
    from tasks.engine.checkpoint import read_meta
    from tasks.evaluate import evaluate

    key = {"model_sha256": read_meta(ckpt).get("model_sha256"), "test": Artifact(test_uri).digest,
           "splits": list(splits)}
    cached = _read_json(cache_uri)
    if cached is not None and cached.get("key") == key:
        return cached["result"]
    res = evaluate(ckpt, test_uri, splits=splits).to_dict()
    _write_json(cache_uri, {"key": key, "result": res})
    return res


def _train_progress(progress: Progress | None, what: str, rnd: int) -> Callable[[dict], None] | None:
    if progress is None:
        return None
    return lambda rec: progress({"event": "epoch", "what": what, "round": rnd, **rec})


def attack_summary(positions_uri: str) -> dict[str, Any]:
    """Mean true-class probability before/after the attack, the flip rate and evaluations spent."""
    art = Artifact(positions_uri)
    t = art.read(["fitness", "clean_prob", "evals"])
    if t.num_rows == 0:
        return {"rows": 0}
    fit = t.column("fitness").to_numpy()
    clean = t.column("clean_prob").to_numpy()
    return {"rows": t.num_rows, "mean_fitness": float(fit.mean()), "mean_clean_prob": float(clean.mean()),
            "lowered": float((fit < clean).mean()), "mean_evals": float(t.column("evals").to_numpy().mean()),
            "rejects": int(art.manifest.extra.get("rejects", 0))}


def student_train_config(teacher_cfg: TrainConfig, cfg: PasmConfig, seed: int | None = None) -> TrainConfig:
    """The student's recipe: the teacher's, with Eq. 4's alpha/beta and the student epochs.

    Without teacher (``no_teacher``) the student is trained like the teacher was (its epochs, CE only):
    it starts from the teacher's initialisation, so refining epochs would leave it undertrained.
    """
    seed = teacher_cfg.seed if seed is None else seed
    if cfg.no_teacher:
        return baseline_train_config(teacher_cfg, seed)
    return replace(teacher_cfg, alpha=cfg.alpha, beta=cfg.beta if cfg.uses_teacher else 0.0,
                   epochs=cfg.student_epochs or teacher_cfg.epochs, seed=seed)


def baseline_train_config(teacher_cfg: TrainConfig, seed: int, random_erasing: float = 0.0) -> TrainConfig:
    """Table VII's recipe: the teacher's own (init, epochs, schedule), CE only, optionally online random erasing."""
    return replace(teacher_cfg, alpha=1.0, beta=0.0, seed=seed, random_erasing=random_erasing)


def erase_config_for(cfg: PasmConfig, *, random_position: bool, seed: int, image_size: int | None = None
                     ) -> EraseConfig:
    """The erase settings of a round: PASM's (attacked positions) or the random-erasing ablation's.

    Random erasing has no positions table to take the image size from: ``image_size`` (default: the
    erase config's, else ``cfg.train.input_size``) should be the teacher's input size.
    """
    e = replace(cfg.erase, random_position=random_position, seed=seed)
    if random_position:
        e = replace(e, image_size=image_size or cfg.erase.image_size or cfg.train.input_size,
                    splits=tuple(cfg.train.train_splits))
    return e


def train_student(train_cfg: TrainConfig, cfg: PasmConfig, erased_uri: str, images_uri: str, teacher_uri: str,
                  out_uri: str, progress: Callable[[dict], None] | None = None) -> str:
    """Algorithm 1 line 11: train the student on the erased images with Eq. 4; returns its checkpoint.

    ``train_cfg`` comes from :func:`student_train_config`. The teacher gives the MSE targets unless
    ``cfg.no_teacher`` (or beta = 0); the student starts from the teacher's weights when
    ``cfg.student_init == "teacher"``; ``cfg.student_data == "both"`` adds the original images.
    """
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.train import train

    cfg = cfg.validate()
    teacher = load_checkpoint(teacher_uri)[0] if cfg.uses_teacher and train_cfg.beta > 0 else None
    init_from = teacher_uri if cfg.student_from_teacher else None
    data = [erased_uri] + ([images_uri] if cfg.student_data == "both" else [])
    return train(train_cfg, data, out_uri, teacher=teacher, init_from=init_from, progress=progress).checkpoint_uri


def _train_student(cfg: PasmConfig, erased: str, table_uri: str, out: str, teacher_uri: str, rnd: int, what: str,
                   progress: Progress | None) -> str:
    _emit(progress, event="student", what=what, round=rnd, uri=out)
    scfg = student_train_config(cfg.train, cfg, seed=cfg.train.seed + rnd)
    return train_student(scfg, cfg, erased, table_uri, teacher_uri, out, _train_progress(progress, what, rnd))


def pasm_round(cfg: PasmConfig, table_uri: str, teacher_uri: str, round_dir: str, rnd: int, *,
               test_uri: str | None = None, attack_stage: AttackStage | None = None,
               progress: Progress | None = None) -> RoundResult:
    """One round of Algorithm 1 (lines 4-12) in ``round_dir``: attack, erase, student, evaluate."""
    cfg = cfg.validate()
    test_uri = test_uri or table_uri
    attack_stage = attack_stage or attack_table
    positions = None
    attack_info: dict[str, Any] = {}
    erased = join(round_dir, "erased")
    if not cfg.random_erasing:
        positions = join(round_dir, "positions")
        if not is_finished(positions):
            _emit(progress, event="attack", round=rnd, uri=positions)
            acfg = replace(cfg.attack, seed=cfg.attack.seed + rnd, splits=tuple(cfg.train.train_splits))
            attack_stage(teacher_uri, table_uri, positions, acfg)
        attack_info = attack_summary(positions)
        if not is_finished(erased):
            _emit(progress, event="erase", round=rnd, uri=erased)
            ecfg = erase_config_for(cfg, random_position=False, seed=cfg.erase.seed + rnd)
            erase_table(table_uri, positions, erased, ecfg)
    elif not is_finished(erased):
        _emit(progress, event="erase", round=rnd, uri=erased)
        erase_table(table_uri, None, erased, _random_erase_cfg(cfg, rnd))
    student = _train_student(cfg, erased, table_uri, join(round_dir, "student"), teacher_uri, rnd, "student", progress)
    _emit(progress, event="evaluate", round=rnd, uri=student)
    ev = _evaluate(student, test_uri, cfg.test_splits, join(round_dir, "student_eval.json"))
    res = RoundResult(rnd, teacher_uri, student, erased, positions, ev["accuracy"], ev["mean_class_accuracy"],
                      attack=attack_info)
    _write_json(join(round_dir, "round.json"), res.to_dict())
    _emit(progress, event="round", round=rnd, result=res.to_dict())
    return res


def _random_erase_cfg(cfg: PasmConfig, rnd: int) -> EraseConfig:
    return erase_config_for(cfg, random_position=True, seed=cfg.erase.seed + 1000 * rnd)


def _check_config(out_uri: str, cfg: PasmConfig, table_uri: str, test_uri: str, teacher_uri: str | None) -> None:
    """A PASM folder holds one run: resuming it with other settings would mix rounds of two experiments."""
    want = {"config": cfg.to_dict(), "table": table_uri, "test": test_uri, "teacher": teacher_uri}
    # Rounds may be extended (a 3-round run continues a 2-round one); everything else must match.
    norm = lambda d: {**d, "config": {k: v for k, v in d["config"].items() if k != "rounds"}}  # noqa: E731
    uri = join(out_uri, CONFIG_FILE)
    have = _read_json(uri)
    if have is not None and norm(have) != norm(json.loads(json.dumps(want))):
        raise ValueError(f"{out_uri} holds a PASM run with other settings or inputs; use another output folder "
                         "(or the same options to resume it)")
    _write_json(uri, want)


def run_pasm(cfg: PasmConfig, table_uri: str, out_uri: str, *, test_uri: str | None = None,
             teacher_uri: str | None = None, attack_stage: AttackStage | None = None,
             progress: Progress | None = None) -> PasmResult:
    """Algorithm 1 end to end; returns every round's test accuracy next to the teacher's.

    ``teacher_uri``: an existing checkpoint to start from (else one is trained on ``table_uri`` with CE,
    Eq. 1, into ``<out>/teacher``). ``test_uri``: the table whose ``cfg.test_splits`` rows are evaluated
    (default ``table_uri``). ``attack_stage``: how the attack runs (default in-process; the CLI passes
    the Ray stage, workers.attack.run_attack).

    Layout: ``<out>/pasm.json`` (settings), ``teacher/``, ``round-<r>/{positions, erased, student,
    round.json}``, ``erased_samples.png`` (Fig. 3), ``summary.json``.
    """
    from tasks.train import train

    cfg = cfg.validate()
    test_uri = test_uri or table_uri
    Artifact(table_uri)  # fails early, with the reason, on a missing or unfinished table
    _check_config(out_uri, cfg, table_uri, test_uri, teacher_uri)
    if teacher_uri is None:
        teacher_uri = join(out_uri, "teacher")
        _emit(progress, event="teacher", round=0, uri=teacher_uri)
        tcfg = replace(cfg.train, alpha=1.0, beta=0.0)
        train(tcfg, [table_uri], teacher_uri, progress=_train_progress(progress, "teacher", 0))
    _emit(progress, event="evaluate", round=0, uri=teacher_uri)
    tev = _evaluate(teacher_uri, test_uri, cfg.test_splits, join(out_uri, "teacher_eval.json"))
    rounds: list[RoundResult] = []
    teacher = teacher_uri
    for rnd in range(1, cfg.rounds + 1):
        res = pasm_round(cfg, table_uri, teacher, join(out_uri, f"round-{rnd}"), rnd, test_uri=test_uri,
                         attack_stage=attack_stage, progress=progress)
        rounds.append(res)
        teacher = res.student_uri  # Algorithm 1 line 12: the student becomes the teacher
    figure = None
    if cfg.figure_samples > 0:
        title = ("random erasing (ablation): erased samples per round" if cfg.random_erasing
                 else "PASM: new learning materials per round (Fig. 3)")
        figure = _save_figure(out_uri, [r.erased_uri for r in rounds], table_uri, cfg.figure_samples, title)
    result = PasmResult(out_uri, teacher_uri, tev["accuracy"], tev["mean_class_accuracy"], rounds, figure)
    _write_json(join(out_uri, SUMMARY_FILE), result.to_dict())
    return result


def _save_figure(out_uri: str, erased_uris: list[str], table_uri: str, n: int, title: str) -> str:
    """matplotlib writes local files: draw to a temporary file, then copy it under ``out_uri`` (any fsspec URI)."""
    import os
    import tempfile

    from tasks.engine.checkpoint import atomic_write_bytes
    from tasks.pasm.figure import pasm_figure

    with tempfile.TemporaryDirectory(prefix="fermine-pasm-") as tmp:
        local = os.path.join(tmp, FIGURE_FILE)
        pasm_figure(table_uri, erased_uris, local, n=n, title=title)
        with open(local, "rb") as f:
            data = f.read()
    uri = join(out_uri, FIGURE_FILE)
    atomic_write_bytes(uri, data)
    return uri
