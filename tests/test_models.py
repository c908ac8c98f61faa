"""Backbone registry, penultimate features, pretrained weights from local files, checkpoints."""


import pytest
import torch

from tasks import models as M
from tasks.engine.checkpoint import atomic_write_bytes, load_checkpoint, read_meta, save_checkpoint
from tasks.models import FERNet, available_models, build_model, load_pretrained


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests share 2 cores with other jobs: one intra-op thread avoids OpenMP oversubscription (5-10x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

FEATURE_DIMS = {"small_cnn": 192, "resnet18": 512, "resnet34": 512, "resnet50": 2048, "vgg16": 4096}


def test_registry_lists_the_papers_backbones():
    assert set(FEATURE_DIMS) <= set(available_models())


@pytest.mark.parametrize("arch", sorted(FEATURE_DIMS))
def test_every_arch_exposes_features_and_head(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7).eval()
    assert isinstance(model, FERNet) and model.arch == arch and model.num_classes == 7
    assert model.feature_dim == FEATURE_DIMS[arch]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model.features(x)
        logits = model(x)
    assert f.shape == (2, FEATURE_DIMS[arch])
    assert logits.shape == (2, 7)
    # forward is exactly head(features): mining and feature losses rely on it
    torch.testing.assert_close(model.head(f), logits)


@pytest.mark.parametrize("size", [32, 64, 112])
def test_small_cnn_input_sizes(size):
    model = build_model("small_cnn", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, size, size)).shape == (3, 5)


def test_small_cnn_is_much_cheaper_than_resnet18():
    small = sum(p.numel() for p in build_model("small_cnn").parameters())
    r18 = sum(p.numel() for p in build_model("resnet18").parameters())
    assert small * 20 < r18


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ValueError, match="unknown architecture 'resnet7'.*small_cnn"):
        build_model("resnet7")


def test_register_model_adds_an_arch_and_refuses_duplicates():
    name = "test_tiny_linear"

    @M.register_model(name)
    def _tiny(num_classes: int = 7) -> FERNet:
        body = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return FERNet(name, body, 3, num_classes)

    try:
        assert build_model(name, 4)(torch.zeros(1, 3, 8, 8)).shape == (1, 4)
        with pytest.raises(ValueError, match="already registered"):
            M.register_model(name)(_tiny)
    finally:
        M._REGISTRY.pop(name)


def _equal_except_head(a: torch.nn.Module, b: dict) -> None:
    for k, v in a.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, b[k]), k


def test_pretrained_torchvision_state_dict_resets_the_classifier(tmp_path):
    import torchvision

    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)  # stands in for an ImageNet file: same keys, 1000 classes
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(tv.state_dict(), path)
    with pytest.warns(UserWarning, match="classifier head re-initialised"):
        model = build_model("resnet18", num_classes=7, pretrained=str(path))
    tv_sd = tv.state_dict()
    for k, v in model.body.state_dict().items():
        assert torch.equal(v, tv_sd[k]), k
    assert model.head.weight.shape == (7, 512)


def test_torchvision_vgg_keys_map_onto_fc6_fc7_and_head():
    # The file round trip is covered with ResNet above; a 528 MB VGG file would only slow the suite down.
    import torchvision

    tv = torchvision.models.vgg16(weights=None)
    model = build_model("vgg16", num_classes=1000)
    mapped = M._to_fernet_keys(model, tv.state_dict())
    assert mapped.keys() == model.state_dict().keys()
    model.load_state_dict(mapped)
    assert torch.equal(model.body.classifier[3].weight, tv.classifier[3].weight)  # fc7
    assert torch.equal(model.head.weight, tv.classifier[6].weight)  # fc8 -> head
    assert torch.equal(model.body.features[0].weight, tv.features[0].weight)


def test_pretrained_plain_state_dict_and_checkpoint_folder_load_everything(tmp_path):
    torch.manual_seed(2)
    src = build_model("small_cnn")
    torch.save({"model": src.state_dict()}, tmp_path / "wrapped.pt")  # e.g. a training state
    save_checkpoint(str(tmp_path / "ckpt"), src, {"input_size": 32})
    for path in (tmp_path / "wrapped.pt", tmp_path / "ckpt"):
        torch.manual_seed(3)
        dst = build_model("small_cnn")
        report = load_pretrained(dst, str(path))
        assert not report.head_reset and report.loaded == len(src.state_dict())
        for k, v in src.state_dict().items():
            assert torch.equal(v, dst.state_dict()[k]), k


def test_pretrained_with_other_class_count_loads_backbone_only(tmp_path):
    src = build_model("small_cnn", num_classes=8)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = build_model("small_cnn", num_classes=7)
    report = load_pretrained(dst, str(tmp_path / "w.pt"))
    assert report.head_reset
    _equal_except_head(dst, src.state_dict())


def test_pretrained_for_another_arch_is_refused_clearly(tmp_path):
    torch.save(build_model("small_cnn").state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="does not fit architecture 'resnet18'.*missing"):
        build_model("resnet18", pretrained=str(tmp_path / "small.pt"))


def test_pretrained_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("small_cnn", pretrained=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"this is not torch")
    with pytest.raises(ValueError, match="not a PyTorch weights file"):
        build_model("small_cnn", pretrained=str(tmp_path / "junk.pt"))


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(4)
    model = build_model("small_cnn")
    uri = str(tmp_path / "ck")
    save_checkpoint(uri, model, {"input_size": 48, "metrics": {"accuracy": float("nan"), "loss": 0.5}})
    loaded, meta = load_checkpoint(uri)
    assert not loaded.training
    assert meta["arch"] == "small_cnn" and meta["num_classes"] == 7 and meta["input_size"] == 48
    assert meta["classes"][0] == "neutral" and meta["classes"][-1] == "surprise"
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["metrics"] == {"accuracy": None, "loss": 0.5}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert read_meta(uri)["model_sha256"] == meta["model_sha256"]
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith("_tmp-")]


def test_checkpoint_in_memory_filesystem():
    model = build_model("small_cnn")
    save_checkpoint("memory://ckpts/a", model, {"input_size": 32})
    loaded, meta = load_checkpoint("memory://ckpts/a")
    assert meta["input_size"] == 32 and torch.equal(loaded.head.weight, model.head.weight)


def test_torn_checkpoint_is_detected(tmp_path):
    uri = str(tmp_path / "ck")
    save_checkpoint(uri, build_model("small_cnn"), {})
    # a crash between the two renames: model.pt from another run next to this model.json
    torch.save(build_model("small_cnn").state_dict(), tmp_path / "ck" / "model.pt")
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(uri)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing"))


def test_atomic_write_leaves_old_file_when_the_write_fails(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    target = tmp_path / "model.pt"
    atomic_write_bytes(str(target), b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(local.LocalFileSystem, "mv", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
