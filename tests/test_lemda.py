"""LeMDA-lite: gradient reversal, the augmentor, its regularisers, and a short real training run."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cocomix_nb.lemda import Augmentor, LeMDAStage, augment_pair, grad_reverse
from cocomix_nb.model import DualEncoder, ModelConfig, TokenDualEncoder, infonce_loss
from cocomix_nb.stage import create_stage
from cocomix_nb.train import make_config, train

SEEDS = range(5)


def small_model(seed: int = 0) -> DualEncoder:
    torch.manual_seed(seed)
    return DualEncoder(ModelConfig(image_dim=32, text_dim=16, embed_dim=8))


def random_batch(size: int = 16) -> dict:
    return dict(image=torch.randn(size, 32), text={"cls": torch.randn(size, 16), "mean": torch.randn(size, 16)},
                image_ids=torch.arange(size))


def perturbing_augmentor(dim: int, std: float = 0.1, **kwargs) -> Augmentor:
    "An augmentor whose zero-initialised last layer was given random weights, so its output is not 0."
    augmentor = Augmentor(dim=dim, **kwargs)
    nn.init.normal_(augmentor.net[-1].weight, std=std)
    nn.init.normal_(augmentor.net[-1].bias, std=std)
    return augmentor


def test_grad_reverse_forward_is_identity():
    x = torch.randn(5, 3, requires_grad=True)
    assert torch.equal(grad_reverse(x, scale=2.5), x)


@pytest.mark.parametrize("scale", [1.0, 2.5, 0.0])
def test_grad_reverse_flips_and_scales(scale):
    x = torch.randn(5, 3, requires_grad=True)
    torch.tanh(grad_reverse(x, scale)).pow(2).sum().backward()
    reversed_grad = x.grad.clone()

    x.grad = None
    torch.tanh(x).pow(2).sum().backward()
    assert torch.allclose(reversed_grad, -scale * x.grad)


def test_augmentor_starts_at_zero():
    augmentor = Augmentor(dim=16, hidden=32)
    assert torch.equal(augmentor.net[-1].weight, torch.zeros_like(augmentor.net[-1].weight))
    assert torch.equal(augmentor(torch.randn(4, 16)), torch.zeros(4, 16))


def test_augment_pair_identity_at_start():
    image_emb = F.normalize(torch.randn(6, 8), dim=-1)
    text_emb = F.normalize(torch.randn(6, 8), dim=-1)
    aug = augment_pair(Augmentor(dim=16, hidden=32, max_norm=0.5), image_emb, text_emb, logit_scale=14.0)

    assert torch.equal(aug.image_emb, F.normalize(image_emb, dim=-1))
    assert torch.equal(aug.text_emb, F.normalize(text_emb, dim=-1))
    assert aug.logs["perturbation_norm"] == 0.0
    assert aug.losses["anchor"].item() == 0.0
    assert aug.losses["consistency"].item() == pytest.approx(0.0, abs=1e-6)


def test_augment_pair_outputs_unit_rows():
    torch.manual_seed(0)
    image_emb = F.normalize(torch.randn(6, 8), dim=-1)
    text_emb = F.normalize(torch.randn(6, 8), dim=-1)
    aug = augment_pair(perturbing_augmentor(16, std=0.5, hidden=32), image_emb, text_emb, logit_scale=14.0)

    assert aug.image_emb.shape == (6, 8)
    assert aug.text_emb.shape == (6, 8)
    assert torch.allclose(aug.image_emb.norm(dim=1), torch.ones(6))
    assert torch.allclose(aug.text_emb.norm(dim=1), torch.ones(6))
    assert not torch.allclose(aug.image_emb, image_emb)
    assert aug.logs["perturbation_norm"] > 0


def test_augment_pair_anchor_value():
    torch.manual_seed(1)
    augmentor = perturbing_augmentor(16, std=0.3, hidden=32)
    image_emb = F.normalize(torch.randn(6, 8), dim=-1)
    text_emb = F.normalize(torch.randn(6, 8), dim=-1)
    aug = augment_pair(augmentor, image_emb, text_emb, logit_scale=14.0, anchor_weight=0.7)

    delta = augmentor(torch.cat([image_emb, text_emb], dim=1))
    expected = 0.7 * (delta ** 2).sum(dim=1).mean()
    assert aug.losses["anchor"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert aug.logs["perturbation_norm"] == pytest.approx(delta.norm(dim=1).mean().item(), rel=1e-5)


def augmented_infonce(model, augmentor, batch) -> torch.Tensor:
    image_emb, text_emb = model(batch["image"], batch["text"])
    aug = augment_pair(augmentor, image_emb, text_emb, model.logit_scale)
    return infonce_loss(aug.image_emb, aug.text_emb, model.logit_scale, batch["image_ids"])


def sgd_step(module: nn.Module, lr: float = 0.01):
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.grad is not None:
                parameter -= lr * parameter.grad


@pytest.mark.parametrize("seed", SEEDS)
def test_augmentor_step_raises_augmented_loss(seed):
    model = small_model(seed)
    augmentor = perturbing_augmentor(16, hidden=32)
    batch = random_batch()

    before = augmented_infonce(model, augmentor, batch)
    before.backward()
    sgd_step(augmentor)
    with torch.no_grad():
        after = augmented_infonce(model, augmentor, batch)
    assert after.item() > before.item() + 1e-6


@pytest.mark.parametrize("seed", SEEDS)
def test_model_step_lowers_augmented_loss(seed):
    model = small_model(seed)
    augmentor = perturbing_augmentor(16, hidden=32)
    batch = random_batch()
    augmentor_before = copy.deepcopy(augmentor.state_dict())

    before = augmented_infonce(model, augmentor, batch)
    before.backward()
    sgd_step(model)
    with torch.no_grad():
        after = augmented_infonce(model, augmentor, batch)
    assert after.item() < before.item() - 1e-6
    for name, value in augmentor.state_dict().items():
        assert torch.equal(value, augmentor_before[name]), name


def test_max_norm_bounds_every_row():
    torch.manual_seed(2)
    unbounded = perturbing_augmentor(16, std=1.0, hidden=32)
    fused = torch.randn(32, 16)
    raw = unbounded(fused)
    raw_norms = raw.norm(dim=1)
    bound = raw_norms.median().item()  # half the rows are longer than the bound
    bounded = Augmentor(dim=16, hidden=32, max_norm=bound)
    bounded.load_state_dict(unbounded.state_dict())

    delta = bounded(fused)
    assert (delta.norm(dim=1) <= bound + 1e-6).all()
    long_rows = raw_norms > bound
    assert long_rows.any(), "the case needs rows longer than the bound"
    assert (~long_rows).any(), "the case needs rows within the bound"
    assert torch.allclose(delta[long_rows].norm(dim=1), torch.full((int(long_rows.sum()),), bound))
    assert torch.allclose(delta[long_rows], raw[long_rows] * (bound / raw_norms[long_rows, None]))
    assert torch.equal(delta[~long_rows], raw[~long_rows])


def test_augmentor_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        Augmentor(dim=16)(torch.randn(4, 12))
    with pytest.raises(ValueError, match="no context"):
        Augmentor(dim=16, context_dim=3)(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"\[4, 3\].*\[4, 2\]"):
        Augmentor(dim=16, context_dim=3)(torch.randn(4, 16), torch.randn(4, 2))
    with pytest.raises(ValueError, match="context_dim=0"):
        Augmentor(dim=16)(torch.randn(4, 16), torch.randn(4, 3))
    with pytest.raises(ValueError, match="max_norm"):
        Augmentor(dim=16, max_norm=0.0)


def test_augmentor_uses_context():
    torch.manual_seed(3)
    augmentor = perturbing_augmentor(16, hidden=32, context_dim=3)
    fused = torch.randn(4, 16)
    first = augmentor(fused, torch.zeros(4, 3))
    second = augmentor(fused, torch.ones(4, 3))
    assert first.shape == (4, 16)
    assert not torch.allclose(first, second)


def one_confident_row():
    """Unit embeddings whose similarity matrix is [[1, 0, 0], [1, 0, 0], [0, 1, 0]].

    At logit scale 10 only image 0 -> caption 0 has p[i, i] > 0.5, because column 0 splits between
    images 0 and 1 and every other diagonal entry is small.
    """
    eye = torch.eye(3)
    image_emb = torch.stack([eye[0], eye[0], eye[1]])
    text_emb = torch.stack([eye[0], eye[1], eye[2]])
    return image_emb, text_emb


def test_consistency_counts_only_confident_rows():
    torch.manual_seed(4)
    augmentor = perturbing_augmentor(6, std=0.5, hidden=16)
    image_emb, text_emb = one_confident_row()
    aug = augment_pair(augmentor, image_emb, text_emb, logit_scale=10.0, consistency_weight=0.5)

    assert aug.logs["consistency_rows"] == pytest.approx(1 / 6)

    # Independent computation: KL(p_orig || p_aug) of image row 0 only.
    delta = augmentor(torch.cat([image_emb, text_emb], dim=1)).detach()
    aug_image = F.normalize(image_emb + delta[:, :3], dim=-1)
    aug_text = F.normalize(text_emb + delta[:, 3:], dim=-1)
    p_orig = torch.softmax(10.0 * image_emb[0] @ text_emb.T, dim=0)
    log_p_aug = torch.log_softmax(10.0 * aug_image[0] @ aug_text.T, dim=0)
    expected = 0.5 * (p_orig * (p_orig.log() - log_p_aug)).sum()
    assert expected.item() > 1e-4, "the case needs a perturbation that changes row 0"
    assert aug.losses["consistency"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_consistency_float32_under_autocast():
    torch.manual_seed(9)
    augmentor = perturbing_augmentor(16, std=0.05, hidden=32)
    image_emb = F.normalize(torch.randn(8, 8), dim=-1)
    text_emb = F.normalize(image_emb + 0.1 * torch.randn(8, 8), dim=-1)
    plain = augment_pair(augmentor, image_emb, text_emb, logit_scale=50.0, confidence=0.0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = augment_pair(augmentor, image_emb, text_emb, logit_scale=50.0, confidence=0.0)

    assert autocast.losses["consistency"].dtype == torch.float32
    assert autocast.losses["consistency"].item() == pytest.approx(plain.losses["consistency"].item(), rel=0.05)


def test_consistency_zero_without_confident_rows():
    torch.manual_seed(5)
    augmentor = perturbing_augmentor(6, std=0.5, hidden=16)
    image_emb, text_emb = one_confident_row()
    # The one confident row has p[0, 0] = e^10 / (e^10 + 2), about 0.99991.
    aug = augment_pair(augmentor, image_emb, text_emb, logit_scale=10.0, confidence=0.99999)

    assert aug.logs["consistency_rows"] == 0.0
    assert aug.losses["consistency"].item() == 0.0
    assert aug.losses["consistency"].requires_grad


def test_regulariser_gradients_reach_only_augmentor():
    model = small_model(6)
    augmentor = perturbing_augmentor(16, std=0.3, hidden=32)
    image_emb, text_emb = model(*[random_batch()[key] for key in ("image", "text")])

    for name in ("consistency", "anchor"):
        model.zero_grad(set_to_none=True)
        augmentor.zero_grad(set_to_none=True)
        # confidence=0 counts every row, so the consistency loss is not trivially 0.
        aug = augment_pair(augmentor, image_emb, text_emb, model.logit_scale, confidence=0.0)
        aug.losses[name].backward()
        for parameter_name, parameter in model.named_parameters():
            assert parameter.grad is None, f"{name} loss reached model parameter {parameter_name}"
        assert augmentor.net[-1].weight.grad is not None
        assert augmentor.net[-1].weight.grad.abs().sum() > 0, f"{name} loss did not reach the augmentor"


def test_stage_built_by_name():
    stage = create_stage("lemda", hidden=32, max_norm=1.0, embed_dim=8)
    assert isinstance(stage, LeMDAStage)
    assert stage.augmentor.dim == 16
    assert stage.augmentor.max_norm == 1.0
    optimizer = stage.optimizer(1e-3)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in stage.augmentor.parameters()}


def test_stage_output_global_model():
    model = small_model(7)
    stage = create_stage("lemda", hidden=32, embed_dim=8)
    batch = random_batch(6)
    image_emb, text_emb = model(batch["image"], batch["text"])
    out = stage(batch, image_emb, text_emb, model)

    assert len(out.pairs) == 1
    pair_images, pair_texts, pair_ids = out.pairs[0]
    # A fresh augmentor is the identity: the extra pairs are the real ones, normalised once more.
    assert torch.equal(pair_images, F.normalize(image_emb, dim=-1))
    assert torch.equal(pair_texts, F.normalize(text_emb, dim=-1))
    assert torch.equal(pair_ids, batch["image_ids"])
    assert sorted(out.losses) == ["anchor", "consistency"]
    assert sorted(out.logs) == ["consistency_rows", "perturbation_norm"]
    assert all(isinstance(value, float) for value in out.logs.values())


def test_stage_output_token_model():
    torch.manual_seed(8)
    model = TokenDualEncoder(ModelConfig(image_dim=32, text_dim=16, embed_dim=8))
    stage = create_stage("lemda", hidden=32, embed_dim=8)
    text = {"tokens": torch.randn(4, 7, 16), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    image_emb, text_emb = model(torch.randn(4, 5, 32), text)
    out = stage(dict(image_ids=torch.arange(4)), image_emb, text_emb, model)
    assert out.pairs[0][0].shape == (4, 8)


def test_stage_rejects_bad_parameters():
    with pytest.raises(TypeError, match="alpha"):
        create_stage("lemda", alpha=1.0)
    with pytest.raises(ValueError, match="confidence"):
        create_stage("lemda", confidence=1.5)
    with pytest.raises(ValueError, match="anchor_weight"):
        create_stage("lemda", anchor_weight=-1.0)

    model = small_model()
    batch = random_batch(4)
    image_emb, text_emb = model(batch["image"], batch["text"])
    with pytest.raises(ValueError, match="embed_dim=8"):
        create_stage("lemda", embed_dim=256)(batch, image_emb, text_emb, model)


def test_lemda_training_run(mini_root, tmp_path):
    out = tmp_path / "lemda-0"
    metrics = train(make_config("cpu-mini", stage="lemda", data_root=str(mini_root), max_images=60, epochs=1,
                                batch_size=16, out_dir=str(out)))

    written = json.loads((out / "metrics.json").read_text())
    assert written["config"]["stage"] == "lemda"
    assert len(written["history"]) == 1
    epoch = written["history"][0]
    for key in ("perturbation_norm", "consistency_rows", "loss_anchor", "loss_consistency", "loss_extra_pair_0"):
        assert key in epoch, key
    # The augmentor starts at zero and leaves it after its first optimiser step.
    assert epoch["perturbation_norm"] > 0
    assert 0.0 <= epoch["consistency_rows"] <= 1.0
    assert metrics["test"]["rsum"] > 0
