"""Semantic pairing: label Jaccard, pairing loss, partner choice, neighbour quality and the pairing stage."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cocomix_nb.data import load_coco_split
from cocomix_nb.pairing import (PairingNetwork, PairingStage, choose_partners, jaccard_matrix, neighbour_jaccard,
                                pairing_loss, pairing_quality, random_partners)
from cocomix_nb.stage import create_stage
from cocomix_nb.train import make_config, train

QUALITY_KEYS = ["k", "pairing_jaccard_at_k", "random_jaccard_at_k", "retrieval_jaccard_at_k"]


def label_set(row) -> set:
    return {int(c) for c in torch.nonzero(torch.as_tensor(row) > 0).flatten()}


def set_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def loop_pairing_loss(vectors: torch.Tensor, labels: torch.Tensor) -> float:
    "The pairing loss written as a plain loop over ordered pairs of labelled samples."
    errors = []
    for i in range(len(vectors)):
        for j in range(len(vectors)):
            a, b = label_set(labels[i]), label_set(labels[j])
            if i == j or not a or not b:
                continue
            errors.append((cosine(vectors[i], vectors[j]) - set_jaccard(a, b)) ** 2)
    return sum(errors) / len(errors)


def random_labels(n: int, n_classes: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, n_classes, generator=generator) < p).float()


# --- jaccard_matrix ----------------------------------------------------------------------------------

def test_jaccard_matrix_hand_values():
    labels = torch.tensor([[1., 1, 0, 0],
                           [0, 1, 1, 0],
                           [1, 1, 0, 0],
                           [0, 0, 0, 1],
                           [0, 0, 0, 0]])
    jaccard, valid = jaccard_matrix(labels)
    assert jaccard.dtype == torch.float32
    assert jaccard[0, 1].item() == pytest.approx(1 / 3)
    assert jaccard[1, 0].item() == pytest.approx(1 / 3)
    assert jaccard[0, 2].item() == pytest.approx(1.0)
    assert jaccard[0, 3].item() == 0.0
    assert jaccard[4, 0].item() == 0.0  # undefined: sample 4 has no labels
    expected_valid = torch.ones(5, 5, dtype=torch.bool)
    expected_valid.fill_diagonal_(False)
    expected_valid[4, :] = False
    expected_valid[:, 4] = False
    assert torch.equal(valid, expected_valid)


def test_jaccard_matrix_accepts_numpy_and_soft_labels():
    jaccard, valid = jaccard_matrix(np.array([[0.5, 0.0], [2.0, 1.0]], dtype=np.float32))
    assert jaccard[0, 1].item() == pytest.approx(0.5)
    assert valid[0, 1].item()


def test_jaccard_matrix_rejects_1d_labels():
    with pytest.raises(ValueError, match="2-D"):
        jaccard_matrix(torch.ones(4))


# --- pairing_loss ------------------------------------------------------------------------------------

def test_pairing_loss_matches_loop():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(12, 6, generator=generator)
    labels = random_labels(12, 5, 0.4, generator)
    labels[[2, 7, 9]] = 0  # samples without labels
    loss = pairing_loss(vectors, labels)
    assert loss.item() == pytest.approx(loop_pairing_loss(vectors, labels), rel=1e-5)


def test_pairing_loss_without_positive_pairs():
    # Every sample has its own class, so every target is 0 and the loss is the mean squared cosine.
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(6, 4, generator=generator, requires_grad=True)
    labels = torch.eye(6)
    loss = pairing_loss(vectors, labels)
    assert loss.item() == pytest.approx(loop_pairing_loss(vectors.detach(), labels), rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    assert vectors.grad.abs().sum() > 0


@pytest.mark.parametrize("labels", [torch.zeros(4, 3),                                   # nobody labelled
                                    torch.tensor([[0., 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]),  # one labelled
                                    torch.zeros(1, 3)])                                  # one sample
def test_pairing_loss_zero_without_valid_pairs(labels):
    vectors = torch.randn(len(labels), 5, requires_grad=True)
    loss = pairing_loss(vectors, labels)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(vectors.grad, torch.zeros_like(vectors))


def test_pairing_loss_ignores_vector_scale():
    generator = torch.Generator().manual_seed(2)
    vectors = torch.randn(8, 4, generator=generator)
    labels = random_labels(8, 4, 0.5, generator)
    assert pairing_loss(vectors * 7, labels).item() == pytest.approx(pairing_loss(vectors, labels).item(), rel=1e-5)


def test_pairing_loss_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="labels has 3"):
        pairing_loss(torch.randn(4, 2), torch.ones(3, 2))


# --- PairingNetwork ----------------------------------------------------------------------------------

def test_pairing_network_outputs_unit_vectors():
    network = PairingNetwork()
    vectors = network(torch.randn(3, 512))
    assert vectors.shape == (3, 128)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))


def test_pairing_network_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\[B, 512\]"):
        PairingNetwork()(torch.randn(3, 256))


# --- choose_partners / random_partners ---------------------------------------------------------------

def brute_force_top(vectors: torch.Tensor, image_ids: torch.Tensor, row: int, k: int) -> list[int]:
    "The indices of the `k` most similar samples of other images than sample `row`, best first."
    candidates = [j for j in range(len(vectors)) if image_ids[j] != image_ids[row]]
    return sorted(candidates, key=lambda j: -cosine(vectors[row], vectors[j]))[:k]


def test_choose_partners_hand_built_similarity():
    # Sample 1 is closest to sample 0 but is another caption of image 10, so sample 0 pairs with sample 2.
    vectors = torch.tensor([[1., 0], [1, 0.1], [1, 0.5], [0, 1]])
    image_ids = torch.tensor([10, 10, 11, 12])
    partner, similarity, valid = choose_partners(vectors, image_ids)
    assert partner.dtype == torch.long
    assert partner.tolist() == [2, 2, 1, 2]
    assert similarity[0].item() == pytest.approx(1 / math.sqrt(1.25))
    assert similarity[3].item() == pytest.approx(0.5 / math.sqrt(1.25))
    assert valid.tolist() == [True] * 4


def test_choose_partners_top1_is_masked_argmax():
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        vectors = torch.randn(16, 8, generator=generator)
        image_ids = torch.randint(0, 6, (16,), generator=generator)
        partner, similarity, valid = choose_partners(vectors, image_ids)
        for row in range(16):
            expected = brute_force_top(vectors, image_ids, row, 1)
            assert valid[row].item() == bool(expected)
            if expected:
                assert partner[row].item() == expected[0]
                assert similarity[row].item() == pytest.approx(cosine(vectors[row], vectors[expected[0]]), abs=1e-5)
                assert partner[row].item() != row
                assert image_ids[partner[row]].item() != image_ids[row].item()


def test_choose_partners_top_k_draws():
    generator = torch.Generator().manual_seed(4)
    vectors = torch.randn(12, 5, generator=generator)
    image_ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 4, 5, 5, 6, 7])
    seen = [set() for _ in range(12)]
    for _ in range(200):
        partner, similarity, valid = choose_partners(vectors, image_ids, top_k=3, generator=generator)
        assert valid.all()
        for row in range(12):
            seen[row].add(partner[row].item())
            expected_similarity = cosine(vectors[row], vectors[partner[row]])
            assert similarity[row].item() == pytest.approx(expected_similarity, abs=1e-5)
    for row in range(12):
        assert seen[row] == set(brute_force_top(vectors, image_ids, row, 3))


def test_choose_partners_top_k_beyond_eligible_count():
    # Each sample has only two eligible partners (image 1 has two captions), so top_k=5 draws from those two.
    vectors = torch.randn(4, 3)
    image_ids = torch.tensor([1, 1, 2, 3])
    generator = torch.Generator().manual_seed(5)
    draws = Counter(choose_partners(vectors, image_ids, top_k=5, generator=generator)[0][0].item()
                    for _ in range(200))
    assert set(draws) == {2, 3}


def test_choose_partners_seeded_draws_repeat():
    vectors = torch.randn(10, 4)
    image_ids = torch.arange(10)
    first = choose_partners(vectors, image_ids, top_k=4, generator=torch.Generator().manual_seed(6))[0]
    second = choose_partners(vectors, image_ids, top_k=4, generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("image_ids", [[7, 7, 7], [7]])
def test_choose_partners_flags_rows_without_partner(image_ids):
    n = len(image_ids)
    partner, similarity, valid = choose_partners(torch.randn(n, 4), torch.tensor(image_ids), top_k=2)
    assert partner.tolist() == list(range(n))
    assert similarity.tolist() == [0.0] * n
    assert valid.tolist() == [False] * n


def test_choose_partners_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        choose_partners(torch.randn(3, 2), torch.arange(3), top_k=0)
    with pytest.raises(ValueError, match="image_ids"):
        choose_partners(torch.randn(3, 2), torch.arange(4))


def test_random_partners_obeys_exclusions_and_covers_candidates():
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])
    generator = torch.Generator().manual_seed(7)
    counts = [Counter() for _ in range(6)]
    for _ in range(600):
        partner, valid = random_partners(image_ids, generator)
        assert partner.dtype == torch.long
        assert valid.all()
        for row in range(6):
            counts[row][partner[row].item()] += 1
    for row in range(6):
        eligible = {j for j in range(6) if image_ids[j] != image_ids[row]}
        assert set(counts[row]) == eligible
        # Uniform over 3 or 4 candidates in 600 draws: each expected 150 or 200 times.
        assert min(counts[row].values()) > 600 / len(eligible) * 0.6


@pytest.mark.parametrize("image_ids", [[3, 3], [3]])
def test_random_partners_flags_rows_without_partner(image_ids):
    partner, valid = random_partners(torch.tensor(image_ids))
    assert partner.tolist() == list(range(len(image_ids)))
    assert valid.tolist() == [False] * len(image_ids)


# --- neighbour_jaccard / pairing_quality -------------------------------------------------------------

def brute_force_neighbour_jaccard(vectors, labels, groups, k) -> float:
    values = []
    for i in range(len(vectors)):
        query = label_set(labels[i])
        if not query:
            continue
        candidates = [j for j in range(len(vectors)) if groups[j] != groups[i] and label_set(labels[j])]
        candidates.sort(key=lambda j: -cosine(vectors[i], vectors[j]))
        values += [set_jaccard(query, label_set(labels[j])) for j in candidates[:k]]
    return sum(values) / len(values)


def test_neighbour_jaccard_matches_brute_force():
    generator = torch.Generator().manual_seed(8)
    vectors = torch.randn(60, 16, generator=generator)
    labels = random_labels(60, 6, 0.3, generator)
    labels[::9] = 0
    groups = torch.arange(60) // 3  # three captions per image
    for k in (1, 5):
        expected = brute_force_neighbour_jaccard(vectors, labels, groups, k)
        assert neighbour_jaccard(vectors, labels, groups, k=k) == pytest.approx(expected, rel=1e-6)
        assert neighbour_jaccard(vectors, labels, groups, k=k, chunk_size=7) == pytest.approx(expected, rel=1e-6)


def test_neighbour_jaccard_fewer_candidates_than_k():
    vectors = torch.tensor([[1., 0], [1, 0.1], [1, 0.3], [1, 0.2]])
    labels = torch.tensor([[1., 0], [1, 0], [1, 1], [0, 0]])
    groups = np.array([0, 0, 1, 2])
    expected = brute_force_neighbour_jaccard(vectors, labels, groups, 5)
    assert neighbour_jaccard(vectors, labels.numpy(), groups, k=5) == pytest.approx(expected)
    assert expected == pytest.approx(0.5)


def test_neighbour_jaccard_nan_without_neighbours():
    value = neighbour_jaccard(torch.randn(3, 2), torch.ones(3, 2), torch.zeros(3), k=2)
    assert math.isnan(value)


def test_pairing_quality_keys_and_seed():
    generator = torch.Generator().manual_seed(9)
    vectors = torch.randn(40, 8, generator=generator)
    labels = random_labels(40, 6, 0.3, generator)
    groups = torch.arange(40) // 2
    retrieval = torch.randn(40, 12, generator=generator)
    quality = pairing_quality(vectors, labels, groups, retrieval, k=3, seed=1)
    assert sorted(quality) == QUALITY_KEYS
    assert quality["k"] == 3
    assert quality["pairing_jaccard_at_k"] == pytest.approx(neighbour_jaccard(vectors, labels, groups, k=3))
    assert quality["retrieval_jaccard_at_k"] == pytest.approx(neighbour_jaccard(retrieval, labels, groups, k=3))
    assert 0 <= quality["random_jaccard_at_k"] <= 1
    again = pairing_quality(vectors, labels, groups, retrieval, k=3, seed=1)
    assert again["random_jaccard_at_k"] == quality["random_jaccard_at_k"]


def test_pairing_quality_random_matches_mean_jaccard():
    # With every sample eligible for every other, k = N - 1 random neighbours cover all of them, so the
    # random reference equals the mean Jaccard over all ordered pairs.
    generator = torch.Generator().manual_seed(10)
    labels = random_labels(10, 4, 0.5, generator)
    labels[labels.sum(1) == 0, 0] = 1
    jaccard, valid = jaccard_matrix(labels)
    quality = pairing_quality(torch.randn(10, 3), labels, torch.arange(10), torch.randn(10, 3), k=9)
    assert quality["random_jaccard_at_k"] == pytest.approx(jaccard[valid].mean().item(), rel=1e-6)


# --- learning on real COCO labels --------------------------------------------------------------------

def test_network_learns_coco_label_neighbours(mini_root):
    train_labels = torch.from_numpy(load_coco_split("train", mini_root).labels)
    val_labels = torch.from_numpy(load_coco_split("val", mini_root).labels)
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(80, 32, generator=generator)

    def features(labels):
        # 32 dimensions that carry the labels, and 96 of stronger noise that the network must learn to ignore.
        signal = labels @ projection + 0.5 * torch.randn(len(labels), 32, generator=generator)
        return torch.cat([signal, 2 * torch.randn(len(labels), 96, generator=generator)], dim=1)

    train_features, val_features = features(train_labels), features(val_labels)
    torch.manual_seed(0)
    network = PairingNetwork(128, 128, 32)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    for _ in range(300):
        batch = torch.randint(0, len(train_labels), (64,), generator=generator)
        loss = pairing_loss(network(train_features[batch]), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        quality = pairing_quality(network(val_features), val_labels, torch.arange(len(val_labels)), val_features)
    # Measured with these seeds: about 0.42 learned, 0.20 random, 0.30 on the raw features.
    assert quality["pairing_jaccard_at_k"] > quality["random_jaccard_at_k"] + 0.1
    assert quality["pairing_jaccard_at_k"] > quality["retrieval_jaccard_at_k"] + 0.05


# --- PairingStage ------------------------------------------------------------------------------------

def test_create_stage_pairing():
    stage = create_stage("pairing")
    assert isinstance(stage, PairingStage)
    assert stage.network.in_dim == 512
    assert stage.optimizer(1e-3) is not None
    assert create_stage("pairing", embed_dim=64, out_dim=16).network.mlp[-1].out_features == 16


def test_pairing_stage_leaves_retrieval_model_unchanged():
    stage = PairingStage(embed_dim=8, hidden=16, out_dim=4, weight=0.5)
    image_emb = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    text_emb = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    labels = torch.tensor([[1., 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 1]])
    out = stage(dict(labels=labels), image_emb, text_emb, None)
    assert out.pairs == []
    assert sorted(out.losses) == ["pairing"]
    unweighted = pairing_loss(stage.pair_vectors(image_emb, text_emb), labels).item()
    assert out.logs["pairing_loss"] == pytest.approx(unweighted)
    assert out.losses["pairing"].item() == pytest.approx(0.5 * unweighted)
    out.losses["pairing"].backward()
    assert image_emb.grad is None
    assert text_emb.grad is None
    assert stage.network.mlp[0].weight.grad.abs().sum() > 0


def test_pairing_stage_rejects_embed_dim_mismatch():
    stage = PairingStage()
    with pytest.raises(ValueError, match="embed_dim=256"):
        stage.pair_vectors(torch.randn(2, 128), torch.randn(2, 128))


def test_pairing_stage_evaluate_uses_one_sample_per_caption():
    stage = PairingStage(embed_dim=8, hidden=16, out_dim=4, k=2)
    generator = torch.Generator().manual_seed(11)
    image_emb = torch.randn(5, 8, generator=generator)
    text_emb = torch.randn(11, 8, generator=generator)
    caption_to_image = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4])
    labels = random_labels(5, 6, 0.4, generator).numpy()
    labels[0, 0] = 1
    report = stage.evaluate(None, dict(image_emb=image_emb, text_emb=text_emb, labels=labels,
                                       caption_to_image=caption_to_image))
    fused = torch.cat([image_emb[caption_to_image], text_emb], dim=1)
    with torch.no_grad():
        expected = pairing_quality(stage.network(fused), labels[caption_to_image], caption_to_image, fused, k=2)
    assert report == expected


def test_pairing_stage_training_run(mini_root, tmp_path):
    config = make_config("cpu-mini", stage="pairing", data_root=str(mini_root), max_images=60, epochs=1,
                         batch_size=16, out_dir=str(tmp_path / "pairing"))
    metrics = train(config)
    assert sorted(metrics["stage_test"]) == QUALITY_KEYS
    assert metrics["stage_test"]["k"] == 5
    for key in QUALITY_KEYS[1:]:
        assert 0 <= metrics["stage_test"][key] <= 1
    record = metrics["history"][0]
    assert math.isfinite(record["loss_pairing"])
    assert record["pairing_loss"] == pytest.approx(record["loss_pairing"])
