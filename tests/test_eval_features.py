"""Feature extractors: the FID Inception through both libraries, DINOv2 through timm from a local file,
the digits net; identities; missing weights give clear errors naming the expected file."""

from __future__ import annotations

import pytest
import torch

from eval.digits_net import DigitsFeatureNet, load_digits_net, save_digits_net
from eval.features import (
    INCEPTION_FILE,
    DigitsFeatures,
    DinoV2Features,
    InceptionV3Features,
    resolve_inception_weights,
    write_random_inception_weights,
)
from models.runtime import ConfigError


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")


def test_inception_backends_agree_and_name_their_resize(random_inception):
    images = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    fidelity = InceptionV3Features(str(random_inception))
    tm_tf = InceptionV3Features(str(random_inception), backend="torchmetrics", antialias=False)
    tm_aa = InceptionV3Features(str(random_inception), backend="torchmetrics", antialias=True)
    a, b, c = fidelity(images), tm_tf(images), tm_aa(images)
    assert a.shape == (1, 2048) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same network, same TF1-style resize
    assert not torch.equal(a, c)  # antialiased resize: other features ...
    assert fidelity.identity == tm_tf.identity != tm_aa.identity  # ... and another identity
    assert fidelity.identity.startswith("inception2048-") and fidelity.identity.endswith("tf299")
    grey = images[:, :1]
    assert torch.equal(fidelity._rgb(grey), grey.expand(-1, 3, -1, -1))  # grey images enter as RGB
    with pytest.raises(ConfigError, match="needs features.backend=torchmetrics"):
        InceptionV3Features(str(random_inception), antialias=True)


def test_missing_inception_weights_name_the_expected_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"features.weights=/no/such.pth: no such file.*{INCEPTION_FILE}"):
        InceptionV3Features("/no/such.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=f"does not exist.*{INCEPTION_FILE}"):
        resolve_inception_weights(None, download=False)
    # No network: the download fails at once (nothing listens on port 9) and the error says what to fetch.
    with pytest.raises(FileNotFoundError, match=f"could not download.*{INCEPTION_FILE}.*features.weights="):
        resolve_inception_weights(None, url="http://127.0.0.1:9/weights.pth")
    assert not list((tmp_path / "torch").rglob("*.pth"))  # nothing half-written
    # A file in torch hub's cache is found without any setting.
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"x")
    assert resolve_inception_weights(None, download=False) == cached


def test_inception_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"x": object()}, bad)
    with pytest.raises(ValueError, match="not a plain state dict"):
        InceptionV3Features(str(bad))


def test_dinov2_style_features_from_a_local_timm_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    ext = DinoV2Features(str(tmp_path / "model.safetensors"), model="vit_tiny_patch16_224", image_size=224)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = torch.nn.functional.interpolate(images.float() / 255, size=(224, 224), mode="bicubic", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = ref((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    torch.testing.assert_close(ext(images), expected, rtol=1e-5, atol=1e-5)
    assert ext.dim == 192 and ext.identity.startswith("dinov2-vit_tiny_patch16_224-")
    with pytest.raises(FileNotFoundError, match="features.weights=/no/file"):
        DinoV2Features("/no/file")
    with pytest.raises(ConfigError, match="set features.weights"):
        DinoV2Features(None)


def test_digits_features_are_the_penultimate_layer(tmp_path):
    torch.manual_seed(0)
    net = DigitsFeatureNet(image_size=16, width=8, feature_dim=12)
    path = save_digits_net(tmp_path / "net.pt", net, {"held_out_accuracy": 0.5})
    loaded, meta = load_digits_net(path)
    assert meta["held_out_accuracy"] == 0.5
    ext = DigitsFeatures(str(path))
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        expected = loaded.features(images.float() / 127.5 - 1)
    torch.testing.assert_close(ext(images), expected)
    torch.testing.assert_close(ext(images.expand(-1, 3, -1, -1)), expected)  # grey RGB == grey
    assert ext(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)).shape == (2, 12)  # resized to 16
    assert ext.identity.startswith("digitscnn12-") and ext.identity.endswith("grey16")
    with pytest.raises(FileNotFoundError, match="train_feature_net.py"):
        DigitsFeatures(str(tmp_path / "missing.pt"))
