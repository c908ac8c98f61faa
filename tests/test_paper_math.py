"""The papers' equations, checked against values computed independently in the test.

Each test drives the code's own step function (or the pure function) on tiny tensors / networks and
compares with a value worked out here from the paper's equation, by torch.autograd on a hand-written
loss or by finite differences, so that a wrong sign, the wrong teacher, logits instead of softmax,
a mean instead of a sum, a critic that moves in the encoder step or a wrong hypergradient fails:

- Progressive Teacher (progressive_teacher.md Eq. 1-6, Algorithm 1 lines 6-7): the student update
  of one ``pt_step`` with consistency weight w > 0 equals SGD on
  L_s + w (1/|B|) sum_i sum_c (f_c(x_i; theta'_other) - f_c(x_i; theta))^2 on softmax outputs.
- CAF (contrastive_adversarial_av.md Algorithm 1 lines 6-8): the encoder's line-7 gradient is that of
  L_adv = -mean f_c(f_e(x_w)) through the critic just updated in line 6, the critic does not move (and
  gets no gradient) after line 6, and the weak samples' critic score rises.
- Handcrafted feature losses (handcrafted_feature_losses.md Eq. 9-11, Algorithm 1): trained end to end
  with adaptive weighting, the weight of the feature loss whose target predicts the label grows over
  that of a pure-noise target, whichever of the two x features holds it.
- Dataset distillation (omni_supervised_fer.md Eq. 8, Wang et al. 2018): the gradient learn_distilled
  hands its optimiser for the (softplus-parameterised) step sizes and the images matches central finite
  differences of the real-data loss after the unrolled inner SGD.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import tasks.omni.distill as distill_mod
import tasks.models as models_mod
from storage.artifact import Artifact, ArtifactWriter
from storage.images import encode
from storage.ingest import write_image_table
from storage.schema import image_row
from tasks.caf.method import CAF, CAFConfig
from tasks.data import normalize
from tasks.omni.distill import DistillConfig, learn_distilled, make_net
from tasks.engine import StepContext
from tasks.featloss.method import FeatLossConfig, train_featloss, variant_config
from tasks.featloss.handcrafted import STAGE as FEATURES_STAGE
from tasks.featloss.handcrafted import feature_schema
from tasks.models import FERNet
from tasks.pt.method import PTConfig, PTNet, pt_step


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors on a shared CPU: thread hand-offs cost more than they bring.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- Progressive Teacher, Eq. 1-6


def _linear_pt_net(seed: int, classes: int = 3) -> PTNet:
    """Logits = W x + b on the flattened 3x2x2 normalised image; a scaled init spreads the softmaxes."""
    torch.manual_seed(seed)
    net = PTNet(FERNet("linear", nn.Flatten(), 12, classes), False)
    with torch.no_grad():
        net.net.head.weight.mul_(4.0)
        net.net.head.bias.normal_(0.0, 1.0)
    return net


@pytest.mark.parametrize("guidance,consistency_guidance,target_teacher", [
    ("cross", None, [1, 0]),  # PT: SNet-1 matches TNet-2 (Eq. 2), SNet-2 matches TNet-1 (Eq. 6)
    ("cross", "same", [0, 1]),  # the ablation "two groups, consistency with the own teacher"
    ("same", None, [0, 1]),
])
def test_pt_student_step_is_sgd_on_ce_plus_weighted_softmax_consistency(guidance, consistency_guidance,
                                                                        target_teacher):
    C, nl, nu = 3, 4, 5
    cfg = PTConfig(num_classes=C, epochs=6, consistency_max=10.0, consistency_shape=5.0, guidance=guidance,
                   consistency_guidance=consistency_guidance, turn_iters=1, hflip=False, momentum=0.0,
                   weight_decay=0.0, lr=1.0)
    students = [_linear_pt_net(10), _linear_pt_net(11)]
    teachers = [_linear_pt_net(20), _linear_pt_net(21)]
    students0 = copy.deepcopy(students)
    teachers0 = copy.deepcopy(teachers)  # pt_step EMA-updates the teachers after the student steps
    opts = [torch.optim.SGD(s.parameters(), lr=1.0) for s in students]
    g = torch.Generator().manual_seed(0)
    xl = torch.randint(0, 256, (nl, 3, 2, 2), generator=g, dtype=torch.uint8)
    xu = torch.randint(0, 256, (nu, 3, 2, 2), generator=g, dtype=torch.uint8)
    yl = torch.tensor([0, 1, 2, 0])
    info = pt_step(students, teachers, opts, xl, yl, xu, t=1, epoch_pos=2.0, cfg=cfg, forget_rate=0.0,
                   gen=torch.Generator().manual_seed(1))

    w = 10.0 * math.exp(-5.0 * (1.0 - 2.0 / 6.0) ** 2)  # Eq. 3/4 ramp-up at epoch 2 of N = 6
    assert info.weight == pytest.approx(w) and w > 1.0
    x = normalize(torch.cat([xl, xu]))  # B: labeled and unlabeled images alike
    with torch.no_grad():
        t_probs = [F.softmax(t(x)[0], dim=1) for t in teachers0]
    assert not torch.allclose(t_probs[0], t_probs[1], atol=0.05)  # the teachers disagree: the target matters
    for j, s0 in enumerate(students0):
        assert bool(info.used_by_student[j].all())  # R = 1 (r = 0): every labeled sample is learned
        logits = s0(x)[0]
        l_s = F.cross_entropy(logits[:nl], yl)  # Eq. 1/5 over L and B_k (all of it here)
        p, q = F.softmax(logits, dim=1), t_probs[target_teacher[j]]
        # Eq. 2/6: 1/|B| sum_{i in B} || f(x_i, theta'_k) - f(x_i, theta_j) ||^2, written out term by term.
        l_u = sum((q[i, c] - p[i, c]) ** 2 for i in range(nl + nu) for c in range(C)) / (nl + nu)
        assert info.cons_loss[j] == pytest.approx(float(l_u.detach()), rel=1e-5)
        assert info.sup_loss[j] == pytest.approx(float(l_s.detach()), rel=1e-5)
        cons_grads = torch.autograd.grad(w * l_u, list(s0.parameters()), retain_graph=True)
        grads = torch.autograd.grad(l_s + w * l_u, list(s0.parameters()))  # Eq. 3/4, Algorithm 1 lines 6-7
        for p_new, p_old, gr, gc in zip(students[j].parameters(), s0.parameters(), grads, cons_grads):
            assert float(gc.abs().max()) > 1e-2  # the consistency term moves the student noticeably, and
            torch.testing.assert_close(p_new.detach(), p_old.detach() - 1.0 * gr, rtol=1e-5, atol=1e-6)  # exactly so


# ---------------------------------------------------------------- CAF, Algorithm 1 lines 6-8


def _tiny_regressor(arch: str, num_classes: int = 7, pretrained: str | None = None) -> FERNet:
    """A 6-feature encoder without BatchNorm or dropout (so re-running it reproduces the step's forward)."""
    return FERNet("tiny", nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 6), nn.Tanh()), 6, num_classes)


def _va_batch() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """8 images; radius 0.1 (weak, indices 0-3) or 0.8 (strong, 4-7), on the diagonals of the four quadrants,
    so the Otsu thresholds of |a| and |v| split them cleanly."""
    signs = [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    va = [(s * r / math.sqrt(2), t * r / math.sqrt(2)) for r in (0.1, 0.8) for s, t in signs]
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor(va, dtype=torch.float32), [0, 1, 2, 3]


def test_caf_adversarial_step_uses_the_updated_frozen_critic_and_raises_weak_scores(monkeypatch):
    monkeypatch.setattr(models_mod, "build_model", _tiny_regressor)  # CAF.setup builds its encoder through it
    cfg = CAFConfig(input_size=16, batch_size=8, lr=1e-3, critic_hidden=8, critic_dim=4, margin="constant",
                    hflip=False, device="cpu")
    tr = CAF(cfg)
    ctx = StepContext(torch.device("cpu"), cfg.seed, False, None, 1)
    torch.manual_seed(cfg.seed)
    tr.setup(ctx)
    x, y, weak = _va_batch()
    model0, critic0 = copy.deepcopy(tr.model), copy.deepcopy(tr.critic)

    calls: list[dict] = []

    def spy(name: str, opt: torch.optim.Optimizer) -> None:
        orig = opt.step

        def step(*a, **k):
            rec = {"name": name, "critic": _params(tr.critic), "critic_grad": _grads(tr.critic),
                   "body": _params(tr.model.body), "body_grad": _grads(tr.model.body), "head": _params(tr.model.head)}
            out = orig(*a, **k)
            rec.update(critic_after=_params(tr.critic), body_after=_params(tr.model.body))
            calls.append(rec)
            return out

        opt.step = step

    spy("critic", tr.critic_opt)
    spy("encoder", tr.enc_opt)
    spy("regressor", tr.reg_opt)
    out = tr.training_step((x, y), ctx)  # one iteration of Algorithm 1, epoch 0
    # line 6 (critic), line 7 (encoder on L_adv), line 8 (encoder + regressor on L_AV)
    assert [c["name"] for c in calls] == ["critic", "encoder", "encoder", "regressor"]
    assert out["weak_frac"] == pytest.approx(0.5)
    line6, line7 = calls[0], calls[1]

    # Line 6 moves the critic; from then on it is frozen: line 7 sees the updated critic, gives it no
    # gradient (its .grad is still line 6's), and neither line 7 nor line 8 changes it.
    critic1 = line6["critic_after"]
    assert not _same(critic1, _params(critic0))
    assert _same(line7["critic"], critic1)
    assert all(a is None or torch.equal(a, b) for a, b in zip(line7["critic_grad"], line6["critic_grad"]))
    assert _same(_params(tr.critic), critic1)
    # Line 7 updates theta_e only: the regression head is untouched until line 8.
    assert _same(line7["head"], _params(model0.head)) and _same(calls[3]["head"], _params(model0.head))
    assert _same(line7["body"], _params(model0.body))  # the encoder has not moved before line 7

    # Line 7's gradient, recomputed: -(1/N_w) sum_i f_c(f_e(x_w_i)) through the *updated* critic (theta_c
    # after line 6), averaged over the critic's d outputs as well (the code's reading of the vector sum).
    fc = copy.deepcopy(critic0)
    with torch.no_grad():
        for p, v in zip(fc.parameters(), critic1):
            p.copy_(v)
    for p in fc.parameters():
        p.requires_grad_(False)
    enc = copy.deepcopy(model0)
    l_adv = -fc(enc.features(x))[weak].mean()
    want = torch.autograd.grad(l_adv, list(enc.body.parameters()))
    for got, exp in zip(line7["body_grad"], want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-8)

    # ... and the adversarial step raises the weak samples' critic score (it lowers L_adv).
    def weak_score(body_params: list[torch.Tensor]) -> float:
        m = copy.deepcopy(model0)
        with torch.no_grad():
            for p, v in zip(m.body.parameters(), body_params):
                p.copy_(v)
            return float(fc(m.features(x[weak])).mean())

    before, after = weak_score(line7["body"]), weak_score(line7["body_after"])
    assert after > before + 1e-4, (before, after)


# ---------------------------------------------------------------- feature losses, Eq. 9-11 end to end

K_FL, D_FL = 3, 6
COLOURS_FL = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220]], dtype=np.float64)


def _tiny_featloss_body(arch: str, num_classes: int = 7, pretrained: str | None = None) -> FERNet:
    """Mean colour of the 4 quadrants -> 16 tanh features: learns the colour classes in a few steps."""
    body = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 16), nn.Tanh())
    return FERNet("tiny", body, 16, num_classes)


def _featloss_artifacts(root, seed: int = 0) -> tuple[str, dict[str, str]]:
    """An image table (3 colour classes, train + val) and two handcrafted-features artifacts of it: in one
    the GSF target is predictive (a class direction + a little noise) and SIFT is noise, in the other the
    roles are swapped."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for split, per_class in (("train", 12), ("val", 6)):
        for i in range(per_class * K_FL):
            c = i % K_FL
            img = np.clip(COLOURS_FL[c][None, None, :] + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            rows.append(image_row(f"{split}-{i:03d}", encode(img), label=c, split=split, source="toy"))
            labels.append(c)
    table = str(root / "table")
    write_image_table(rows, table, stage="ingest", config={"paper_math": 1})
    labels = np.asarray(labels)
    codes = rng.normal(0, 1, (K_FL, D_FL))
    predictive = codes[labels] + 0.1 * rng.normal(0, 1, (len(labels), D_FL))
    # Noise: every class gets the same random vectors, in its own random order, so no class differs from
    # another in its noise targets (not even in their sample mean): they say nothing about the label.
    noise = np.empty((len(labels), D_FL))
    for split, per_class in (("train", 12), ("val", 6)):
        pool = rng.normal(0, 1, (per_class, D_FL))
        for c in range(K_FL):
            at = [i for i, r in enumerate(rows) if r["split"] == split and labels[i] == c]
            noise[at] = pool[rng.permutation(per_class)]
    out = {}
    for name, gsf, sift in (("gsf", predictive, noise), ("sift", noise, predictive)):
        uri = str(root / f"features-{name}")
        cols = {"id": pa.array([r["id"] for r in rows]), "label": pa.array(labels, pa.int8()),
                "split": pa.array([r["split"] for r in rows])}
        for kind, mat in (("gabor", noise), ("gsf", gsf), ("sift", sift)):
            cols[kind] = pa.array([list(map(float, v)) for v in mat], pa.list_(pa.float32()))
        schema = feature_schema(mirror=False)
        with ArtifactWriter(uri, stage=FEATURES_STAGE, config={"paper_math": name},
                            inputs={"table": Artifact(table).digest}, schema=schema) as w:
            w.write(pa.table(cols).select(schema.names).cast(schema))
        out[name] = uri
    return table, out


@pytest.fixture(scope="module")
def featloss_tables(tmp_path_factory):
    return _featloss_artifacts(tmp_path_factory.mktemp("paper_math_fl"))


def _eq10(lam: tuple[float, float], obj1: float, obj2: float, gamma: float, eps: float) -> tuple[float, float]:
    """Eq. 10 written out: amplify the better objective's weight by gamma, then rescale to sum 2."""
    l1, l2 = lam
    if obj1 > obj2 + eps:
        l1 = gamma * l1
    elif obj1 + eps < obj2:
        l2 = gamma * l2
    return 2 * l1 / (l1 + l2), 2 * l2 / (l1 + l2)


@pytest.mark.parametrize("predictive", ["gsf", "sift"])
def test_adaptive_weighting_favours_the_predictive_feature_loss(featloss_tables, predictive, monkeypatch, tmp_path):
    monkeypatch.setattr(models_mod, "build_model", _tiny_featloss_body)  # FeatLossNet builds its body through it
    table, feats = featloss_tables
    base = FeatLossConfig(num_classes=K_FL, input_size=16, load_size=16, epochs=10, round_epochs=5, batch_size=6,
                          lr=0.05, momentum=0.9, weight_decay=0.0, lambda_b=5.0, rho=1.0, gamma=1.2,
                          five_crop=False, hflip=False, class_balanced=False, device="cpu")
    cfg = variant_config("adaptive", base)  # alternative structure, x = (x_1: GSF, x_2: SIFT), adaptive
    assert cfg.x_features == ("gsf", "sift")
    res = train_featloss(cfg, table, feats[predictive], str(tmp_path / "run"))
    good = 0 if predictive == "gsf" else 1
    lam = (1.0, 1.0)
    for h in res.history:
        # Eq. 11: the component trained against the predictive target (the other one masked out at
        # validation, Fig. 4c-d) scores higher; Eq. 10 then amplifies *its* weight by gamma.
        assert h["obj"][good] > h["obj"][1 - good] + 0.05, h
        assert h["lambdas_before"] == pytest.approx(list(lam))
        lam = _eq10(lam, h["obj"][0], h["obj"][1], cfg.gamma, cfg.eps)
        assert h["lambdas"] == pytest.approx(list(lam))
    g = cfg.gamma
    want = [2 * g * g / (g * g + 1), 2 / (g * g + 1)]  # amplified twice, renormalised to sum 2 each time
    assert list(res.lambdas) == pytest.approx(want if good == 0 else want[::-1])
    assert res.lambdas[good] > res.lambdas[1 - good]


# ---------------------------------------------------------------- dataset distillation, Eq. 8


class _RecordingAdam(torch.optim.Adam):
    """Adam that records each parameter's value and gradient when it steps."""

    records: ClassVar[list[list[tuple[torch.Tensor, torch.Tensor | None]]]] = []

    def step(self, closure=None):
        _RecordingAdam.records.append([(p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
                                       for grp in self.param_groups for p in grp["params"]])
        return super().step(closure)


def _real_loss(net: nn.Module, inits: list[dict[str, torch.Tensor]], syn_x: torch.Tensor, syn_y: torch.Tensor,
               etas: torch.Tensor, real_x: torch.Tensor, real_y: torch.Tensor) -> float:
    """Eq. 8 with several inner steps, written out: theta_{s+1} = theta_s - eta_s grad CE(f(x~; theta_s), y~),
    then the real-data CE, averaged over the initialisations (float64)."""
    total = 0.0
    for p0 in inits:
        params = {k: v.detach().clone().requires_grad_(True) for k, v in p0.items()}
        for eta in etas:
            loss = F.cross_entropy(functional_call(net, params, (syn_x,)), syn_y)
            g = torch.autograd.grad(loss, list(params.values()))
            params = {k: (v - eta * gk).detach().requires_grad_(True) for (k, v), gk in zip(params.items(), g)}
        with torch.no_grad():
            total += float(F.cross_entropy(functional_call(net, params, (real_x,)), real_y))
    return total / len(inits)


def test_distillation_step_size_and_image_gradients_match_finite_differences(monkeypatch):
    rng = np.random.default_rng(0)
    n, size = 18, 10
    real_y = torch.arange(n) % 3
    base = np.array([[0.8, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.8]])[real_y.numpy()]
    img = np.clip(base[:, None, None, :] + rng.normal(0, 0.15, (n, size, size, 3)), 0, 1)
    real_u8 = torch.from_numpy((img * 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    # One outer step, the whole real set as its batch (so the batch is the same whatever the order), two
    # initialisations (their losses are averaged) and two inner steps with their own step sizes.
    cfg = DistillConfig(arch="lenet", num_classes=3, image_size=size, outer_steps=1, inner_steps=2, real_batch=n,
                        n_inits=2, init_step_size=1.0, device="cpu", seed=0)

    inits: list[dict[str, torch.Tensor]] = []
    orig_fresh = distill_mod._fresh_params

    def fresh(*a, **k):
        p = orig_fresh(*a, **k)
        inits.append({name: v.detach().clone() for name, v in p.items()})
        return p

    monkeypatch.setattr(distill_mod, "_fresh_params", fresh)
    _RecordingAdam.records = []
    monkeypatch.setattr(torch.optim, "Adam", _RecordingAdam)
    learn_distilled(real_u8, real_y, cfg)
    assert len(inits) == 2 and len(_RecordingAdam.records) == 1
    (syn_x, syn_x_grad), (raw_eta, raw_eta_grad) = _RecordingAdam.records[0]
    assert raw_eta_grad is not None and syn_x_grad is not None  # the step sizes are learned, not detached
    assert F.softplus(raw_eta).tolist() == pytest.approx([1.0, 1.0])  # eta~ = softplus(raw) starts at 1

    net = make_net("lenet", 3).double()
    syn_y = torch.arange(3)
    inits64 = [{k: v.double() for k, v in p.items()} for p in inits]
    xs, xr = syn_x.double(), normalize(real_u8).double()

    def loss_at(raw: torch.Tensor, images: torch.Tensor = xs) -> float:
        return _real_loss(net, inits64, images, syn_y, F.softplus(raw), xr, real_y)

    # d L / d raw_eta_s (through eta = softplus(raw)) by central differences, one inner step at a time.
    raw64, h = raw_eta.double(), 1e-4
    for s in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[s] = h
        fd = (loss_at(raw64 + e) - loss_at(raw64 - e)) / (2 * h)
        assert abs(fd) > 1e-3  # the step size matters ...
        assert float(raw_eta_grad[s]) == pytest.approx(fd, rel=2e-3, abs=1e-6), (s, float(raw_eta_grad[s]), fd)
    # The images' gradient, along a random direction.
    v = torch.randn(xs.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fd = (loss_at(raw64, xs + h * v) - loss_at(raw64, xs - h * v)) / (2 * h)
    assert abs(fd) > 1e-3
    assert float((syn_x_grad.double() * v).sum()) == pytest.approx(fd, rel=2e-3, abs=1e-6)
