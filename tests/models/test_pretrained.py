"""Pretrained-weight loading, offline: the fetch function is replaced by randomly initialised torchvision models.

For the `official` key mode the expected result is computed by doing literally what the official trainer did
(replace the torchvision model's stem conv / classifier, then `cifar_model.load_state_dict(tv.state_dict(),
strict=False)`), so the test does not depend on our loader's logic.
"""
from __future__ import annotations

import copy
import logging
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fisherbench.models import create_model
from fisherbench.models import gpt as gpt_module
from fisherbench.models import pretrained as pt
from fisherbench.models.densenet_cifar import cifar_channel_order


def _randomise_bn_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture
def fake_fetch(monkeypatch):
    """Serve the state dict of a given torchvision model instead of downloading; record what was asked for."""
    calls: list[str] = []
    served: dict[str, dict] = {}

    def serve(weights_name: str, model: nn.Module) -> None:
        served[weights_name] = {k: v.clone() for k, v in model.state_dict().items()}

    def fetch(weights_name: str):
        calls.append(weights_name)
        return served[weights_name]

    monkeypatch.setattr(pt, "fetch_torchvision_state_dict", fetch)
    return serve, calls


@pytest.fixture(scope="module")
def tv_resnet50() -> nn.Module:
    """One randomly initialised torchvision ResNet-50 (with non-trivial BN statistics) for the module."""
    torch.manual_seed(0)
    return _randomise_bn_stats(torchvision.models.resnet50(weights=None)).eval()


def _copied(model: nn.Module, source: dict, mapping=lambda k: k) -> set[str]:
    state = model.state_dict()
    return {k for k, v in state.items() if mapping(k) in source and source[mapping(k)].shape == v.shape
            and torch.equal(v, source[mapping(k)])}


def _official_copy_set(fresh: nn.Module, tv: nn.Module) -> set[str]:
    fresh.load_state_dict(tv.state_dict(), strict=False)
    return _copied(fresh, tv.state_dict())


def test_resnet50_cifar_official_loading_copies_what_the_official_code_copied(fake_fetch, tv_resnet50):
    serve, calls = fake_fetch
    tv = copy.deepcopy(tv_resnet50)
    serve("ResNet50_Weights.IMAGENET1K_V2", tv)
    model = create_model("resnet50_cifar", num_classes=10, pretrained=True)
    assert calls == ["ResNet50_Weights.IMAGENET1K_V2"]

    # the official procedure, literally
    tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tv.fc = nn.Linear(2048, 10)
    official = _official_copy_set(create_model("resnet50_cifar", num_classes=10), tv)
    # conv1: the official copied a freshly initialised 3x3 conv, i.e. a random stem, as ours keeps
    assert _copied(model, tv.state_dict()) == official - {"conv1.weight"}
    assert any(k.startswith("layer4.2.conv3") for k in official)
    assert not any(".shortcut." in k for k in official)  # torchvision calls them downsample: not copied
    assert not any(k.startswith("linear.") for k in official)


def test_resnet_cifar_remap_also_copies_the_shortcuts_and_computes_torchvisions_body(fake_fetch, tv_resnet50):
    serve, _ = fake_fetch
    tv = tv_resnet50
    serve("ResNet50_Weights.IMAGENET1K_V2", tv)
    model = create_model("resnet50_cifar", num_classes=10, pretrained=True, pretrained_keys="remap").eval()
    copied = _copied(model, tv.state_dict(), lambda k: k.replace(".shortcut.", ".downsample."))
    assert copied == {k for k in model.state_dict() if not k.startswith(("conv1.", "linear."))}
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        ours = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        theirs = tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_resnet101_cifar_asks_for_its_own_weights(fake_fetch):
    serve, calls = fake_fetch
    serve("ResNet101_Weights.IMAGENET1K_V2", torchvision.models.resnet101(weights=None))
    model = create_model("resnet101_cifar", num_classes=100, pretrained=True)
    assert calls == ["ResNet101_Weights.IMAGENET1K_V2"]
    assert model.linear.out_features == 100


def test_densenet_official_loading_copies_nothing_and_warns(fake_fetch, caplog):
    serve, _ = fake_fetch
    tv = torchvision.models.densenet121(weights=None)
    serve("DenseNet121_Weights.IMAGENET1K_V1", tv)
    with caplog.at_level(logging.WARNING):
        model = create_model("densenet121_cifar", num_classes=10, pretrained=True)
    tv.classifier = nn.Linear(1024, 10)
    assert _official_copy_set(create_model("densenet121_cifar", num_classes=10), tv) == set()
    assert _copied(model, tv.state_dict()) == set()
    assert "randomly initialised" in caplog.text


def test_densenet_remap_reproduces_torchvisions_blocks(fake_fetch):
    serve, _ = fake_fetch
    tv = _randomise_bn_stats(torchvision.models.densenet121(weights=None)).eval()
    serve("DenseNet121_Weights.IMAGENET1K_V1", tv)
    model = create_model("densenet121_cifar", num_classes=10, pretrained=True, pretrained_keys="remap").eval()
    f = tv.features
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        # inside a block the channel order differs ([new, input] vs [input, new]) ...
        order = cifar_channel_order(64, 32, 6)
        torch.testing.assert_close(model.dense1(x), f.denseblock1(x)[:, order], atol=1e-4, rtol=1e-4)
        # ... but after a transition (whose weights were permuted accordingly) the outputs are identical
        ours = model.trans3(model.dense3(model.trans2(model.dense2(model.trans1(model.dense1(x))))))
        theirs = f.transition3(f.denseblock3(f.transition2(f.denseblock2(f.transition1(f.denseblock1(x))))))
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        final_ours = F.relu(model.bn(model.dense4(ours)))
        final_theirs = F.relu(f.norm5(f.denseblock4(theirs)))
        torch.testing.assert_close(final_ours, final_theirs[:, cifar_channel_order(512, 32, 16)], atol=1e-4,
                                   rtol=1e-4)


def test_mobilenetv3_official_copies_nothing_standard_copies_all_but_the_head(fake_fetch, caplog):
    serve, _ = fake_fetch
    tv = torchvision.models.mobilenet_v3_large(weights=None)
    serve("MobileNet_V3_Large_Weights.IMAGENET1K_V2", tv)
    with caplog.at_level(logging.WARNING):
        official = create_model("mobilenetv3_official", num_classes=10, pretrained=True)
    assert _copied(official, tv.state_dict()) == set()
    assert "randomly initialised" in caplog.text
    standard = create_model("mobilenetv3", num_classes=10, pretrained=True)
    expected = {k for k in standard.state_dict() if not k.startswith("classifier.3.")}
    assert _copied(standard, tv.state_dict()) == expected
    assert standard.features[0][0].stride == (1, 1) and standard.features[2].block[1][0].stride == (1, 1)


def test_resnet50_imagenet_copies_all_but_the_classifier(fake_fetch, tv_resnet50):
    serve, _ = fake_fetch
    tv = tv_resnet50
    serve("ResNet50_Weights.IMAGENET1K_V2", tv)
    model = create_model("resnet50", num_classes=200, input_shape=(3, 64, 64), pretrained=True)
    assert _copied(model, tv.state_dict()) == {k for k in model.state_dict() if not k.startswith("fc.")}
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_offline_download_gives_a_clear_error(monkeypatch, tmp_path):
    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(pt.PretrainedWeightsUnavailable) as err:
        create_model("resnet50_cifar", num_classes=10, pretrained=True)
    message = str(err.value)
    assert "ResNet50_Weights.IMAGENET1K_V2" in message and "download.pytorch.org" in message
    assert "model.pretrained=false" in message and "hub/checkpoints" in message


def test_bad_pretrained_keys_value(fake_fetch):
    with pytest.raises(ValueError, match="pretrained_keys"):
        create_model("resnet50_cifar", pretrained=True, pretrained_keys="everything")


# ------------------------------------------------------------------------------------- GPT embeddings
def test_gpt_embeddings_from_an_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    tokens, position = rng.normal(size=(18, 32)).astype(np.float32), rng.normal(size=(12, 32)).astype(np.float32)
    path = tmp_path / "embeddings.npz"
    np.savez(path, tokens=tokens, position=position)
    model = create_model("tiny_gpt", num_classes=20, input_shape=(8,), embeddings=str(path))
    emb = model.embedding
    assert torch.equal(emb.tokens.weight[:18], torch.from_numpy(tokens))
    assert torch.equal(emb.position.weight, torch.from_numpy(position[:8]))
    assert emb.tokens.weight[18:].abs().max() < 0.2  # the two extra vocabulary rows keep the N(0, 0.02) init
    assert torch.equal(model.classifier.weight[:18], torch.from_numpy(tokens))  # tied
    with pytest.raises(ValueError, match="vocabulary"):
        create_model("tiny_gpt", num_classes=10, input_shape=(8,), embeddings=str(path))
    with pytest.raises(ValueError, match="position"):
        create_model("tiny_gpt", num_classes=20, input_shape=(16,), embeddings=str(path))
    with pytest.raises(gpt_module.EmbeddingsUnavailable, match="does not exist"):
        create_model("tiny_gpt", num_classes=20, input_shape=(8,), embeddings=str(tmp_path / "nope.npz"))


def test_gpt1_hub_embeddings(monkeypatch):
    tokens, position = torch.randn(30, 32), torch.randn(40, 32)
    monkeypatch.setattr(gpt_module, "fetch_gpt1_embeddings", lambda: (tokens, position))
    model = create_model("tiny_gpt", num_classes=30, input_shape=(16,), embeddings="gpt1")
    assert torch.equal(model.embedding.tokens.weight, tokens)
    assert torch.equal(model.embedding.position.weight, position[:16])


def test_gpt1_hub_offline_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(gpt_module.EmbeddingsUnavailable, match="openai-community/openai-gpt.*network"):
        create_model("tiny_gpt", num_classes=30, input_shape=(16,), embeddings="gpt1")
