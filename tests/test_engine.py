"""The training engine (tasks.engine): schedules, the resume rule, the guard, repeatability, trial epochs.

The methods' own behaviour on the engine is tested with each method (test_train, test_caf, test_featloss,
test_progressive_teacher); here a tiny least-squares method exercises what every method relies on.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tasks.engine import Method, ResumeMismatch, Schedule, StepContext, build_optimizer, fit
from tasks.engine.checkpoint import load_checkpoint, load_training_state
from tasks.engine.seeding import ORDER


class Line(Method):
    """Fit y = 3x - 1 with one linear unit: 4 batches of 8 points an epoch, drawn from ctx.generator."""

    name = "line"

    def __init__(self, lr: float = 0.1, poison_at: int | None = None):
        self.lr, self.poison_at = lr, poison_at
        self.seen: list[torch.Tensor] = []

    def setup(self, ctx: StepContext) -> None:
        self.net = ctx.prepare(nn.Linear(1, 1))
        self.optimizers = [build_optimizer("sgd", self.net.parameters(), self.lr, momentum=0.5)]

    def steps_per_epoch(self) -> int:
        return 4

    def batches(self, epoch: int, ctx: StepContext):
        g = ctx.generator(ORDER)
        for _ in range(4):
            x = torch.rand(8, 1, generator=g) * 2 - 1
            yield x, 3 * x - 1

    def training_step(self, batch, ctx: StepContext):
        x, y = batch
        self.seen.append(x)
        loss = ((self.net(x) - y) ** 2).mean()
        if self.poison_at is not None and ctx.global_step >= self.poison_at:
            loss = loss * float("nan")
        return {"loss": loss, "samples": len(x)}

    def state_dict(self):
        return {"net": self.net.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])

    def export(self, ctx: StepContext):
        return self.net, {"model": {"builder": "test_engine:line_from_meta"}, "num_classes": 1, "classes": None,
                          "task": "regression"}


def line_from_meta(meta):
    return nn.Linear(1, 1)


def _fit(method: Method, out: str, epochs: int = 3, config: dict | None = None, inputs: dict | None = None, **kw):
    return fit(method, out, config={"lr": method.lr, "epochs": epochs, **(config or {})},
               inputs=inputs or {"data": "d1"}, epochs=epochs, schedule=kw.pop("schedule", Schedule("step", step=2)),
               seed=kw.pop("seed", 0), device="cpu", **kw)


def test_schedules_are_functions_of_the_position():
    step = Schedule("step", "epoch", step=2, gamma=0.5)
    assert [step.factor(e + 0.5, 10) for e in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    multi = Schedule("multistep", "iteration", milestones=(3, 5), gamma=0.1)
    assert [multi.factor(i + 0.5, 10) for i in range(7)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = Schedule("cosine", warmup=1.0)
    assert cos.factor(0.5, 4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.5 / 4)))
    assert cos.factor(4, 4) == pytest.approx(0.0) and cos.factor(2, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr schedule must be one of"):
        Schedule("exponential")
    with pytest.raises(ValueError, match="lr unit"):
        Schedule(unit="batch")


def test_fit_learns_writes_the_checkpoint_and_follows_the_schedule(tmp_path):
    res = _fit(Line(), str(tmp_path / "run"), epochs=4)
    assert [h["lr"] for h in res.history] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert res.history[-1]["loss"] < res.history[0]["loss"] and res.history[0]["samples"] == 32
    net, meta = load_checkpoint(str(tmp_path / "run"))
    assert meta["method"] == "line" and meta["inputs"] == {"data": "d1"} and meta["config"]["epochs"] == 4
    assert net.weight.item() > 1.5  # from a random start towards 3
    assert _fit(Line(), str(tmp_path / "run"), epochs=4).reused  # finished, same run: returned, not redone


def test_same_config_twice_is_bit_identical_and_a_killed_run_resumes_to_it(tmp_path):
    a = _fit(Line(), str(tmp_path / "a"))
    b = _fit(Line(), str(tmp_path / "b"))
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert torch.equal(load_checkpoint(str(tmp_path / "a"))[0].weight, load_checkpoint(str(tmp_path / "b"))[0].weight)

    class Killed(Exception):
        pass

    def kill(d):
        if d["event"] == "epoch" and d["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        _fit(Line(), str(tmp_path / "k"), progress=kill)
    assert load_training_state(str(tmp_path / "k"))["epoch"] == 2 and not (tmp_path / "k" / "model.json").exists()
    resumed = _fit(Line(), str(tmp_path / "k"))
    assert resumed.resumed_from_epoch == 2 and strip(resumed.history) == strip(a.history)
    assert torch.equal(load_checkpoint(str(tmp_path / "k"))[0].weight, load_checkpoint(str(tmp_path / "a"))[0].weight)
    assert _fit(Line(), str(tmp_path / "s1"), seed=1).history[0]["loss"] != a.history[0]["loss"]  # other batches


def test_resume_refuses_another_config_or_input_naming_it(tmp_path):
    out = str(tmp_path / "run")
    _fit(Line(), out, epochs=2)
    with pytest.raises(ResumeMismatch, match=r"different configuration \(lr: 0.1 -> 0.2\)"):
        _fit(Line(lr=0.2), out, epochs=2)
    with pytest.raises(ResumeMismatch, match="other contents of data"):
        _fit(Line(), out, epochs=2, inputs={"data": "d2"})
    with pytest.raises(ResumeMismatch, match="other inputs"):
        _fit(Line(), out, epochs=2, inputs={"data": "d1", "init": "w"})
    # runtime fields may change; a step schedule's run extends to more epochs, from where it stopped
    ext = _fit(Line(), out, epochs=3, config={"device": "cuda", "log_every": 1})
    assert ext.resumed_from_epoch == 2 and len(ext.history) == 3
    with pytest.raises(ValueError, match="already holds 3 epochs, more than the 2 asked"):
        _fit(Line(), out, epochs=2)
    # a cosine schedule depends on the length: its epoch count must match
    cos = str(tmp_path / "cos")
    _fit(Line(), cos, epochs=2, schedule=Schedule("cosine"))
    with pytest.raises(ResumeMismatch, match="epochs: 2 -> 3"):
        _fit(Line(), cos, epochs=3, schedule=Schedule("cosine"))


def test_divergence_is_stopped_with_a_clear_error_and_no_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="diverged.*lower the learning rate"):
        _fit(Line(poison_at=5), str(tmp_path / "nan"))
    assert not (tmp_path / "nan" / "model.json").exists()


def test_max_steps_caps_the_updates_and_trial_epochs_leave_no_trace(tmp_path):
    m = Line()
    res = _fit(m, str(tmp_path / "cap"), epochs=99, max_steps=6, schedule=Schedule("step", "iteration", step=4))
    assert [h["steps"] for h in res.history] == [4, 2]
    assert [h["lr"] for h in res.history] == pytest.approx([0.1, 0.01])

    class Trial(Line):
        def on_epoch_start(self, epoch, ctx):
            if epoch == 1:
                snap = {k: v.clone() for k, v in self.net.state_dict().items()}
                out = ctx.train_epoch(epoch)
                self.net.load_state_dict(snap)
                return {"trial_loss": out["loss"]}
            return None

    trial = Trial()
    res = _fit(trial, str(tmp_path / "trial"))
    # the trial ran epoch 1's own batches (4 steps) before the epoch itself; the run's step count is not moved
    assert "trial_loss" in res.history[1]
    assert all(torch.equal(a, b) for a, b in zip(trial.seen[4:8], trial.seen[8:12]))
    assert load_training_state(str(tmp_path / "trial"))["global_step"] == 12


def test_checkpoints_of_the_previous_format_still_load(tmp_path):
    """model.json format 1 (before the engine) had no task, model builder or method: a FERNet classifier."""
    import json

    from tasks.engine.checkpoint import save_checkpoint
    from tasks.models import build_model

    torch.manual_seed(0)
    net = build_model("small_cnn", 7)
    save_checkpoint(str(tmp_path / "ck"), net, {"input_size": 32})
    meta_path = tmp_path / "ck" / "model.json"
    meta = json.loads(meta_path.read_text())
    for k in ("task", "model", "method"):
        meta.pop(k, None)
    meta["format"] = 1
    meta_path.write_text(json.dumps(meta))
    loaded, got = load_checkpoint(str(tmp_path / "ck"))
    assert torch.equal(loaded.head.weight, net.head.weight) and got.get("task", "classification") == "classification"
