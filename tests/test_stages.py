"""Hybrid premix, TokenMix and the alignment-aware augmentor: mixing rules, masks, λ = 1 identity, training runs."""
import pytest
import torch
import torch.nn.functional as F

from cocomix_nb.alignaware import AlignAwareStage, alignment_context
from cocomix_nb.model import DualEncoder, ModelConfig, TokenDualEncoder, content_mask
from cocomix_nb.premix import PremixStage, mix_features, mix_lambda
from cocomix_nb.stage import create_stage
from cocomix_nb.tokenmix import TokenMixStage, mix_text_positionwise
from cocomix_nb.train import make_config, train

SMALL = dict(embed_dim=8, pairing_dim=4, pairing_hidden=16)


def token_batch(seed=0, width=7, n=6):
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 5, 7, 4, 6, 7][:n]
    attention = torch.zeros(n, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention[row, :length] = 1
    return dict(image=torch.randn(n, 49, 12, generator=generator),
                text={"tokens": torch.randn(n, width, 6, generator=generator), "attention_mask": attention},
                image_ids=torch.arange(n), labels=(torch.rand(n, 80, generator=generator) > 0.9).float())


@pytest.fixture
def token_model():
    torch.manual_seed(0)
    model = TokenDualEncoder(ModelConfig(image_dim=12, text_dim=6, embed_dim=8)).eval()
    with torch.no_grad():
        model.image_pool.query.normal_()
        model.text_pool.query.normal_()
    return model


@pytest.mark.parametrize("blend", ["position", "aligned"])
def test_tokenmix_lambda_one_is_identity(blend, token_model):
    batch = token_batch()
    stage = TokenMixStage(blend=blend, same_lambda=True, **SMALL)
    keep, partner = torch.arange(6), torch.tensor([1, 2, 3, 4, 5, 0])
    mixed_image, mixed_text = stage.mix(batch, keep, partner, torch.ones(6))
    assert torch.equal(mixed_image, batch["image"])
    assert torch.equal(mixed_text["content_mask"], content_mask(batch["text"]["attention_mask"]))
    torch.testing.assert_close(token_model.embed_text(mixed_text), token_model.embed_text(batch["text"]))


@pytest.mark.parametrize("blend", ["position", "aligned"])
def test_tokenmix_ignores_padding_and_special_tokens(blend, token_model):
    batch = token_batch()
    stage = TokenMixStage(blend=blend, **SMALL)
    keep, partner, lam = torch.arange(6), torch.tensor([1, 2, 3, 4, 5, 0]), torch.full((6,), 0.7)
    _, clean = stage.mix(batch, keep, partner, lam)
    poisoned = {**batch, "text": dict(batch["text"])}
    tokens = batch["text"]["tokens"].clone()
    not_content = ~content_mask(batch["text"]["attention_mask"])
    tokens[not_content] = 1e6  # [CLS], [SEP] and padding states
    poisoned["text"]["tokens"] = tokens
    _, dirty = stage.mix(poisoned, keep, partner, lam)
    torch.testing.assert_close(token_model.embed_text(dirty), token_model.embed_text(clean))


@pytest.mark.parametrize("blend", ["position", "aligned"])
def test_tokenmix_result_independent_of_batch_padding(blend, token_model):
    batch = token_batch(width=7)
    wider = {**batch, "text": {"tokens": F.pad(batch["text"]["tokens"], (0, 0, 0, 5), value=3.0),
                               "attention_mask": F.pad(batch["text"]["attention_mask"], (0, 5))}}
    stage = TokenMixStage(blend=blend, **SMALL)
    keep, partner, lam = torch.arange(6), torch.tensor([1, 2, 3, 4, 5, 0]), torch.full((6,), 0.6)
    _, narrow_text = stage.mix(batch, keep, partner, lam)
    _, wide_text = stage.mix(wider, keep, partner, lam)
    torch.testing.assert_close(token_model.embed_text(wide_text), token_model.embed_text(narrow_text))


def test_positionwise_mask_is_union_of_content():
    a_mask = torch.tensor([[False, True, False, False]])
    b_mask = torch.tensor([[False, True, True, True]])
    tokens = torch.randn(1, 4, 3)
    _, mask = mix_text_positionwise(tokens, a_mask, tokens, b_mask, torch.tensor([0.5]))
    assert mask.tolist() == [[False, True, True, True]]


def test_premix_hybrid_and_same_lambda_weights():
    lam = torch.tensor([0.8])
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(mix_features(a, b, lam), torch.tensor([[0.8, 0.2]]))
    assert torch.allclose(mix_features(a, b, 1 - lam), torch.tensor([[0.2, 0.8]]))
    assert torch.allclose(mix_lambda(torch.tensor([0.0, 1.0]), 0.5, 0.9), torch.tensor([0.5, 0.9]))


def test_premix_partner_rules():
    torch.manual_seed(0)
    model = DualEncoder(ModelConfig(image_dim=12, text_dim=6, embed_dim=8, text_pool="mean"))
    batch = dict(image=torch.randn(8, 12), text={"mean": torch.randn(8, 6), "cls": torch.randn(8, 6)},
                 image_ids=torch.tensor([1, 1, 1, 2, 2, 3, 4, 4]), labels=torch.zeros(8, 80))
    image_emb, text_emb = model(batch["image"], batch["text"])
    for partner_rule in ("pairing", "random"):
        stage = PremixStage(partner=partner_rule, **SMALL)
        for _ in range(20):
            partner, lam, valid = stage.partners(batch, image_emb, text_emb)
            assert bool(valid.all())
            assert bool((batch["image_ids"][partner] != batch["image_ids"]).all())
            assert bool(((lam >= 0.5) & (lam <= 0.9)).all())


def test_alignaware_context_reaches_augmentor(token_model):
    batch = token_batch()
    image_emb, text_emb = token_model(batch["image"], batch["text"])
    outputs = {}
    for zero in (False, True):
        torch.manual_seed(1)
        stage = AlignAwareStage(zero_context=zero, augmentor_hidden=16, **SMALL)
        with torch.no_grad():
            stage.augmentor.net[-1].weight.normal_(std=0.5)  # move the augmentor away from the identity
        outputs[zero] = stage(batch, image_emb, text_emb, token_model).pairs[0][0]
    assert not torch.allclose(outputs[False], outputs[True])


def test_alignment_context_values():
    unit = F.normalize(torch.randn(5, 8), dim=-1)
    labels = torch.zeros(5, 80)
    labels[:, :4] = 1
    context = alignment_context(unit, unit, unit, -unit, labels)
    torch.testing.assert_close(context[:, 0], torch.ones(5))
    torch.testing.assert_close(context[:, 1], -torch.ones(5))
    torch.testing.assert_close(context[:, 2], torch.full((5,), 0.05))


def test_token_stage_rejects_global_model(mini_root, tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        train(make_config("cpu-mini", stage="tokenmix", data_root=str(mini_root), max_images=30, epochs=1,
                          batch_size=16, out_dir=str(tmp_path / "run")))


@pytest.mark.parametrize("stage, model_type, params", [
    ("premix", "global", {}),
    ("premix", "global", {"partner": "random", "same_lambda": True}),
    ("tokenmix", "token", {"blend": "aligned"}),
    ("alignaware", "token", {"zero_context": True}),
])
def test_stage_trains_on_real_coco(stage, model_type, params, mini_root, tmp_path):
    metrics = train(make_config("cpu-mini", stage=stage, stage_params=params, model_type=model_type,
                                data_root=str(mini_root), max_images=40, epochs=1, batch_size=16,
                                out_dir=str(tmp_path / stage)))
    history = metrics["history"][0]
    assert history["loss_extra_pair_0"] > 0
    assert 0.5 <= history["mix_lambda"] <= 0.9
    assert set(metrics["stage_test"]) >= {"pairing_jaccard_at_k", "random_jaccard_at_k"}
    assert create_stage(stage, **params).name == stage
