"""PASM's settings and its student (Algorithm 1: teacher -> (point attack -> erase -> student) x N).

Round r: the teacher (the trained network for r = 1, the previous student after that) attacks every
training image (tasks.pasm.attack), an s x s region is erased at the found position (tasks.pasm.erase), and a
student of the same architecture is trained on the erased images with
``alpha * CE + beta * MSE(student logits, teacher logits)`` (Eq. 4, tasks.train); it becomes the next
round's teacher. The rounds are wired as stages by the pasm pipeline (flows/round.py); this module holds
PasmConfig and the student's recipe and training step.

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

One more condition is a control of the rounds, not of Table VII (asked for by name, not run by default):

* ``no_erasing``: round 1's student, same recipe (the teacher's weights, Eq. 4 with the teacher), on the
  original images: what refining the teacher alone gives, so that round 1 minus it is the erasing's effect.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from storage.artifact import Artifact
from tasks.pasm.attack import AttackConfig
from tasks.pasm.erase import EraseConfig
from tasks.train import TrainConfig

STUDENT_INITS = ("teacher", "scratch")
COMPARISONS = ("random_erasing", "adversarial_erasing", "no_teacher", "no_erasing")
TABLE7 = ("random_erasing", "adversarial_erasing", "no_teacher")  # the default ``compare``
RANDOM_ERASING_STYLES = ("online", "square")
STUDENT_DATA = ("erased", "both")



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
    # The student's initial learning rate; None = the teacher's (the paper trains both with one recipe).
    # A student refining the teacher's converged weights may want the teacher's final rate instead.
    student_lr: float | None = None
    # The student's step schedule (lr *= lr_gamma every student_lr_step epochs); None = the teacher's. A
    # student trained for fewer epochs than the teacher's lr_step never anneals without it.
    student_lr_step: int | None = None
    random_erasing: bool = False  # ablation: the rounds erase at random positions instead of the attacked ones
    no_teacher: bool = False  # ablation: "PASM w/o teacher" (CE only, beta = 0, the teacher's initialisation)
    compare: tuple[str, ...] = TABLE7  # conditions trained beside the rounds (see above; also "no_erasing")
    random_erasing_style: str = "online"  # "online": Zhong et al. | "square": one offline square, PASM's size
    random_erasing_p: float = 0.5  # Zhong et al.'s erasing probability (online style)

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
        if self.student_lr is not None and self.student_lr <= 0:
            raise ValueError("student_lr must be > 0 (or null: the teacher's)")
        if self.student_lr_step is not None and self.student_lr_step < 1:
            raise ValueError("student_lr_step must be >= 1 (or null: the teacher's lr_step)")
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
                   epochs=cfg.student_epochs or teacher_cfg.epochs, lr=cfg.student_lr or teacher_cfg.lr,
                   lr_step=cfg.student_lr_step or teacher_cfg.lr_step, seed=seed)


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
