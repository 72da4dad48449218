"""Tests for cocomix_nb.metrics against a per-query reference ranking and hand-computed cases."""

import numpy as np
import pytest
import torch

from cocomix_nb.metrics import coco_1k_metrics, i2t_ranks, retrieval_metrics, t2i_ranks

METRIC_KEYS = [
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
    "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr", "n_images", "n_captions",
]


# Reference implementation: one full stable argsort per query.

def pessimistic_order(scores, is_ground_truth):
    """Sort candidate indices by descending score, with ground-truth candidates after tied others.

    Candidates are listed non-ground-truth first, so a stable sort keeps that order among equal scores.
    """
    candidates = np.concatenate([np.flatnonzero(~is_ground_truth), np.flatnonzero(is_ground_truth)])
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order]


def reference_i2t_ranks(sims, caption_to_image):
    sims = np.asarray(sims, dtype=np.float32)  # the module ranks in float32
    ranks = []
    for image in range(sims.shape[0]):
        is_ground_truth = caption_to_image == image
        order = pessimistic_order(sims[image], is_ground_truth)
        positions = [int(np.flatnonzero(order == caption)[0]) for caption in np.flatnonzero(is_ground_truth)]
        ranks.append(min(positions))
    return np.array(ranks, dtype=np.int64)


def reference_t2i_ranks(sims, caption_to_image):
    sims = np.asarray(sims, dtype=np.float32)
    image_ids = np.arange(sims.shape[0])
    ranks = []
    for caption in range(sims.shape[1]):
        is_ground_truth = image_ids == caption_to_image[caption]
        order = pessimistic_order(sims[:, caption], is_ground_truth)
        ranks.append(int(np.flatnonzero(order == caption_to_image[caption])[0]))
    return np.array(ranks, dtype=np.int64)


def random_caption_to_image(rng, n_images, min_captions, max_captions):
    "Give each image between min_captions and max_captions captions, in shuffled order."
    counts = rng.integers(min_captions, max_captions + 1, size=n_images)
    caption_to_image = np.repeat(np.arange(n_images), counts)
    return rng.permutation(caption_to_image)


def random_problem(seed, n_images=40, quantize=False):
    "Return a float64 similarity matrix and a caption index with 4 to 7 captions per image."
    rng = np.random.default_rng(seed)
    caption_to_image = random_caption_to_image(rng, n_images, 4, 7)
    sims = rng.standard_normal((n_images, len(caption_to_image)))
    if quantize:
        sims = np.round(sims, 1)  # many exact ties, including with the ground truth
    return sims, caption_to_image


def l2_normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine_similarity(image_embeddings, caption_embeddings):
    return l2_normalize(image_embeddings) @ l2_normalize(caption_embeddings).T


# Agreement with the reference.

PROBLEMS = [(seed, quantize) for seed in (0, 1, 2) for quantize in (False, True)]


@pytest.mark.parametrize("seed,quantize", PROBLEMS)
@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_i2t_ranks_match_reference(seed, quantize, chunk_size):
    sims, caption_to_image = random_problem(seed, quantize=quantize)
    expected = reference_i2t_ranks(sims, caption_to_image)

    ranks = i2t_ranks(sims, caption_to_image, chunk_size=chunk_size)

    assert ranks.dtype == np.int64
    assert ranks.shape == (sims.shape[0],)
    np.testing.assert_array_equal(ranks, expected)


@pytest.mark.parametrize("seed,quantize", PROBLEMS)
@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_t2i_ranks_match_reference(seed, quantize, chunk_size):
    sims, caption_to_image = random_problem(seed, quantize=quantize)
    expected = reference_t2i_ranks(sims, caption_to_image)

    ranks = t2i_ranks(sims, caption_to_image, chunk_size=chunk_size)

    assert ranks.dtype == np.int64
    assert ranks.shape == (sims.shape[1],)
    np.testing.assert_array_equal(ranks, expected)


def test_random_problems_are_not_trivial():
    "Guard the reference comparison: ranks must spread over hits and misses, and ties must occur."
    sims, caption_to_image = random_problem(0, quantize=True)
    i2t = reference_i2t_ranks(sims, caption_to_image)
    t2i = reference_t2i_ranks(sims, caption_to_image)
    assert (i2t == 0).any()
    assert (i2t >= 10).any()
    assert (t2i == 0).any()
    assert (t2i >= 10).any()

    ground_truth_scores = sims[caption_to_image, np.arange(sims.shape[1])]
    tied_columns = (sims == ground_truth_scores[None, :]).sum(axis=0) > 1
    assert tied_columns.sum() > 10


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_reference(seed):
    sims, caption_to_image = random_problem(seed, quantize=True)
    i2t = reference_i2t_ranks(sims, caption_to_image)
    t2i = reference_t2i_ranks(sims, caption_to_image)

    metrics = retrieval_metrics(sims, caption_to_image, chunk_size=7)

    assert list(metrics) == METRIC_KEYS
    for k in (1, 5, 10):
        assert metrics[f"i2t_r{k}"] == pytest.approx(100.0 * np.mean(i2t < k))
        assert metrics[f"t2i_r{k}"] == pytest.approx(100.0 * np.mean(t2i < k))
    recalls = [metrics[f"{direction}_r{k}"] for direction in ("i2t", "t2i") for k in (1, 5, 10)]
    assert metrics["rsum"] == pytest.approx(sum(recalls))
    assert metrics["i2t_medr"] == np.floor(np.median(i2t)) + 1
    assert metrics["t2i_medr"] == np.floor(np.median(t2i)) + 1
    assert metrics["i2t_meanr"] == pytest.approx(i2t.mean() + 1)
    assert metrics["t2i_meanr"] == pytest.approx(t2i.mean() + 1)
    assert metrics["n_images"] == sims.shape[0]
    assert metrics["n_captions"] == sims.shape[1]


def test_retrieval_metrics_value_types():
    sims, caption_to_image = random_problem(0)
    metrics = retrieval_metrics(sims, caption_to_image)
    for key in METRIC_KEYS[:-2]:
        assert type(metrics[key]) is float, key
    assert type(metrics["n_images"]) is int
    assert type(metrics["n_captions"]) is int


def test_retrieval_metrics_custom_ks():
    sims, caption_to_image = random_problem(0)
    metrics = retrieval_metrics(sims, caption_to_image, ks=(2, 20))
    assert [key for key in metrics if key.startswith(("i2t_r", "t2i_r"))] == ["i2t_r2", "i2t_r20", "t2i_r2", "t2i_r20"]
    assert metrics["rsum"] == pytest.approx(
        metrics["i2t_r2"] + metrics["i2t_r20"] + metrics["t2i_r2"] + metrics["t2i_r20"]
    )


# Hand-computed cases.

def t2i_case(rank_of_caption_zero, n_images=12):
    """One caption per image, every caption first for its image, except caption 0.

    Caption 0 scores its image 0.5 and the first `rank_of_caption_zero` other images 1.0.
    """
    sims = np.eye(n_images)
    sims[0, 0] = 0.5
    sims[1:rank_of_caption_zero + 1, 0] = 1.0
    return sims, np.arange(n_images)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_t2i_recall_boundary_at_k(k):
    hit_sims, caption_to_image = t2i_case(rank_of_caption_zero=k - 1)
    miss_sims, _ = t2i_case(rank_of_caption_zero=k)

    assert t2i_ranks(hit_sims, caption_to_image)[0] == k - 1
    assert t2i_ranks(miss_sims, caption_to_image)[0] == k
    assert retrieval_metrics(hit_sims, caption_to_image)[f"t2i_r{k}"] == pytest.approx(100.0)
    assert retrieval_metrics(miss_sims, caption_to_image)[f"t2i_r{k}"] == pytest.approx(100.0 * 11 / 12)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_i2t_recall_boundary_at_k(k):
    # Transposing the t2i case turns caption 0's column into image 0's row.
    hit_sims, caption_to_image = t2i_case(rank_of_caption_zero=k - 1)
    miss_sims, _ = t2i_case(rank_of_caption_zero=k)
    hit_sims, miss_sims = hit_sims.T, miss_sims.T

    assert i2t_ranks(hit_sims, caption_to_image)[0] == k - 1
    assert i2t_ranks(miss_sims, caption_to_image)[0] == k
    assert retrieval_metrics(hit_sims, caption_to_image)[f"i2t_r{k}"] == pytest.approx(100.0)
    assert retrieval_metrics(miss_sims, caption_to_image)[f"i2t_r{k}"] == pytest.approx(100.0 * 11 / 12)


def test_i2t_and_t2i_not_swapped():
    # Image 0 has captions 0 and 1, image 1 has caption 2. Caption 1 scores image 1 higher.
    sims = np.array([[0.9, 0.1, 0.2],
                     [0.5, 0.3, 0.8]])
    caption_to_image = np.array([0, 0, 1])

    np.testing.assert_array_equal(i2t_ranks(sims, caption_to_image), [0, 0])
    np.testing.assert_array_equal(t2i_ranks(sims, caption_to_image), [0, 1, 0])
    metrics = retrieval_metrics(sims, caption_to_image)
    assert metrics["i2t_r1"] == pytest.approx(100.0)
    assert metrics["t2i_r1"] == pytest.approx(200.0 / 3)
    assert metrics["n_images"] == 2
    assert metrics["n_captions"] == 3


def test_i2t_and_t2i_not_swapped_reverse():
    # Caption 2 of image 1 outscores image 0's captions on image 0's row.
    sims = np.array([[0.9, 0.1, 0.95],
                     [0.5, 0.3, 0.99]])
    caption_to_image = np.array([0, 0, 1])

    np.testing.assert_array_equal(i2t_ranks(sims, caption_to_image), [1, 0])
    np.testing.assert_array_equal(t2i_ranks(sims, caption_to_image), [0, 1, 0])
    metrics = retrieval_metrics(sims, caption_to_image)
    assert metrics["i2t_r1"] == pytest.approx(50.0)
    assert metrics["t2i_r1"] == pytest.approx(200.0 / 3)


def test_ties_count_against_ground_truth():
    caption_to_image = np.array([0, 0, 1, 2, 2, 2])
    sims = np.full((3, 6), 0.5)

    # Every non-ground-truth candidate ties with the ground truth and is ranked ahead of it.
    np.testing.assert_array_equal(i2t_ranks(sims, caption_to_image), [4, 5, 3])
    np.testing.assert_array_equal(t2i_ranks(sims, caption_to_image), [2, 2, 2, 2, 2, 2])
    metrics = retrieval_metrics(sims, caption_to_image)
    assert metrics["i2t_r1"] == 0.0
    assert metrics["t2i_r1"] == 0.0


def test_single_tie_ahead_of_ground_truth():
    # The tied candidate has a larger index than the ground truth, so index order would rank it second.
    sims = np.array([[0.7, 0.7, 0.1],
                     [0.2, 0.8, 0.7],
                     [0.7, 0.1, 0.6]])
    caption_to_image = np.arange(3)

    np.testing.assert_array_equal(i2t_ranks(sims, caption_to_image), [1, 0, 1])
    np.testing.assert_array_equal(t2i_ranks(sims, caption_to_image), [1, 0, 1])


def test_other_ground_truth_captions_not_counted():
    # Image 0's two captions tie at the top: neither is counted against the other.
    sims = np.array([[0.9, 0.9, 0.7, 0.1],
                     [0.1, 0.1, 0.9, 0.8]])
    caption_to_image = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(i2t_ranks(sims, caption_to_image), [0, 0])

    # A distractor tied with them is counted, once.
    sims[0, 2] = 0.9
    np.testing.assert_array_equal(i2t_ranks(sims, caption_to_image), [1, 0])


def test_caption_rescaling_keeps_cosine_ranks():
    rng = np.random.default_rng(3)
    caption_to_image = random_caption_to_image(rng, 30, 4, 7)
    image_embeddings = rng.standard_normal((30, 6))
    caption_embeddings = rng.standard_normal((len(caption_to_image), 6))
    rescaled = caption_embeddings.copy()
    rescaled[5] *= 37.0

    before = cosine_similarity(image_embeddings, caption_embeddings)
    after = cosine_similarity(image_embeddings, rescaled)

    np.testing.assert_array_equal(i2t_ranks(after, caption_to_image), i2t_ranks(before, caption_to_image))
    np.testing.assert_array_equal(t2i_ranks(after, caption_to_image), t2i_ranks(before, caption_to_image))

    # Without normalisation, the same rescaling does move ranks, so the check above is not vacuous.
    raw_before = image_embeddings @ caption_embeddings.T
    raw_after = image_embeddings @ rescaled.T
    assert not np.array_equal(i2t_ranks(raw_after, caption_to_image), i2t_ranks(raw_before, caption_to_image))


def test_medr_meanr_hand_values_odd():
    sims = np.array([[0.9, 0.8, 0.1],
                     [0.1, 0.7, 0.5],
                     [0.2, 0.9, 0.6]])
    caption_to_image = np.arange(3)

    np.testing.assert_array_equal(i2t_ranks(sims, caption_to_image), [0, 0, 1])
    np.testing.assert_array_equal(t2i_ranks(sims, caption_to_image), [0, 2, 0])
    metrics = retrieval_metrics(sims, caption_to_image)
    assert metrics["i2t_medr"] == 1.0
    assert metrics["i2t_meanr"] == pytest.approx(4 / 3)
    assert metrics["t2i_medr"] == 1.0
    assert metrics["t2i_meanr"] == pytest.approx(5 / 3)


def test_medr_floors_even_median():
    # Caption c has exactly c images scored above its own, so both directions rank 0, 1, 2, 3.
    sims = np.array([[0.5, 1.0, 1.0, 1.0],
                     [0.0, 0.5, 1.0, 1.0],
                     [0.0, 0.0, 0.5, 1.0],
                     [0.0, 0.0, 0.0, 0.5]])
    caption_to_image = np.arange(4)

    np.testing.assert_array_equal(i2t_ranks(sims, caption_to_image), [3, 2, 1, 0])
    np.testing.assert_array_equal(t2i_ranks(sims, caption_to_image), [0, 1, 2, 3])
    metrics = retrieval_metrics(sims, caption_to_image)
    # median(0-based) = 1.5, so medr = floor(1.5) + 1 = 2, as in VSE++; the 1-based median would be 2.5.
    assert metrics["i2t_medr"] == 2.0
    assert metrics["t2i_medr"] == 2.0
    assert metrics["i2t_meanr"] == 2.5
    assert metrics["t2i_meanr"] == 2.5
    assert metrics["i2t_r1"] == 25.0
    assert metrics["t2i_r5"] == 100.0


# COCO 1K protocol.

@pytest.fixture(scope="module")
def coco_5k_problem():
    "5,000 images with 1 to 3 captions each in shuffled order, scored by cosine of 8-d embeddings."
    rng = np.random.default_rng(7)
    caption_to_image = random_caption_to_image(rng, 5000, 1, 3)
    image_embeddings = rng.standard_normal((5000, 8)).astype(np.float32)
    noise = rng.standard_normal((len(caption_to_image), 8)).astype(np.float32)
    caption_embeddings = image_embeddings[caption_to_image] + 1.5 * noise
    sims = cosine_similarity(image_embeddings, caption_embeddings).astype(np.float32)
    return sims, caption_to_image


def test_coco_1k_equals_mean_of_folds(coco_5k_problem):
    sims, caption_to_image = coco_5k_problem
    per_fold = []
    for fold in range(5):
        images = np.arange(fold * 1000, (fold + 1) * 1000)
        captions = np.flatnonzero(np.isin(caption_to_image, images))
        fold_sims = sims[images][:, captions]
        per_fold.append(retrieval_metrics(fold_sims, caption_to_image[captions] - fold * 1000))

    metrics = coco_1k_metrics(sims, caption_to_image)

    assert list(metrics) == METRIC_KEYS + ["n_folds"]
    assert metrics["n_folds"] == 5
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(np.mean([fold[key] for fold in per_fold]), abs=1e-9), key
    assert metrics["n_images"] == 1000.0
    assert metrics["n_captions"] == pytest.approx(len(caption_to_image) / 5)
    # The folds must differ from the full 5K evaluation, or this test could not tell them apart.
    assert metrics["t2i_r1"] > retrieval_metrics(sims, caption_to_image)["t2i_r1"]
    assert 0.0 < metrics["i2t_r1"] < 100.0


def test_coco_1k_rejects_4999_images(coco_5k_problem):
    sims, caption_to_image = coco_5k_problem
    first_4999_captions = caption_to_image < 4999
    with pytest.raises(ValueError, match="4999"):
        coco_1k_metrics(sims[:4999][:, first_4999_captions], caption_to_image[first_4999_captions])


def test_coco_1k_torch_input(coco_5k_problem):
    sims, caption_to_image = coco_5k_problem
    small = sims[:500][:, caption_to_image < 500]
    small_caption_to_image = caption_to_image[caption_to_image < 500]
    expected = coco_1k_metrics(small, small_caption_to_image, n_folds=5, fold_size=100)
    actual = coco_1k_metrics(torch.from_numpy(small), torch.from_numpy(small_caption_to_image),
                             n_folds=5, fold_size=100)
    assert actual == expected


# Input types and devices.

def test_torch_input_equals_numpy():
    sims, caption_to_image = random_problem(4, quantize=True)
    expected = retrieval_metrics(sims, caption_to_image)

    assert retrieval_metrics(torch.from_numpy(sims), caption_to_image) == expected
    assert retrieval_metrics(torch.from_numpy(sims).float(), torch.from_numpy(caption_to_image)) == expected
    assert retrieval_metrics(sims.astype(np.float32), caption_to_image.astype(np.int32)) == expected
    np.testing.assert_array_equal(
        t2i_ranks(torch.from_numpy(sims), caption_to_image, chunk_size=5),
        t2i_ranks(sims, caption_to_image, chunk_size=5),
    )


def test_torch_input_with_grad():
    sims, caption_to_image = random_problem(5)
    tensor = torch.tensor(sims, requires_grad=True)
    assert retrieval_metrics(tensor, caption_to_image) == retrieval_metrics(sims, caption_to_image)


def test_non_contiguous_input():
    sims, caption_to_image = random_problem(6)
    reversed_rows = sims[::-1]
    reversed_caption_to_image = sims.shape[0] - 1 - caption_to_image
    expected = reference_i2t_ranks(reversed_rows, reversed_caption_to_image)
    np.testing.assert_array_equal(i2t_ranks(reversed_rows, reversed_caption_to_image), expected)
    np.testing.assert_array_equal(
        t2i_ranks(np.asfortranarray(sims), caption_to_image), reference_t2i_ranks(sims, caption_to_image)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_input_equals_numpy():
    sims, caption_to_image = random_problem(4, quantize=True)
    expected = retrieval_metrics(sims, caption_to_image, chunk_size=7)
    actual = retrieval_metrics(torch.from_numpy(sims).cuda(), caption_to_image, chunk_size=7)
    assert actual == expected


def test_t2i_accepts_uncaptioned_images():
    sims = np.array([[0.9, 0.1],
                     [0.2, 0.8],
                     [0.5, 0.85]])
    caption_to_image = np.array([0, 1])
    # Image 2 has no caption but still outscores image 1 for caption 1.
    np.testing.assert_array_equal(t2i_ranks(sims, caption_to_image), [0, 1])


# Input validation.

GOOD_SIMS = np.array([[0.9, 0.1, 0.3],
                      [0.2, 0.8, 0.4]])
GOOD_CAPTION_TO_IMAGE = np.array([0, 1, 0])


@pytest.mark.parametrize("function", [i2t_ranks, t2i_ranks, retrieval_metrics])
@pytest.mark.parametrize("sims,caption_to_image,message", [
    (GOOD_SIMS[0], GOOD_CAPTION_TO_IMAGE, r"must be 2-D .* got shape \(3,\)"),
    (GOOD_SIMS[None], GOOD_CAPTION_TO_IMAGE, r"must be 2-D .* got shape \(1, 2, 3\)"),
    (GOOD_SIMS[:, :0], GOOD_CAPTION_TO_IMAGE[:0], r"at least one image and one caption"),
    (GOOD_SIMS, GOOD_CAPTION_TO_IMAGE[:2], r"length 2 but sims has 3 caption columns"),
    (GOOD_SIMS, np.array([[0, 1, 0]]), r"caption_to_image must be 1-D"),
    (GOOD_SIMS, np.array([0, 2, 0]), r"caption_to_image\[1\] = 2 is not a valid image index.*\[0, 2\)"),
    (GOOD_SIMS, np.array([0, 1, -1]), r"caption_to_image\[2\] = -1 is not a valid image index"),
    (GOOD_SIMS, np.array([0.0, 1.0, 0.0]), r"must contain integers, got dtype float64"),
    (np.where(GOOD_SIMS == 0.8, np.nan, GOOD_SIMS), GOOD_CAPTION_TO_IMAGE, r"sims\[1, 1\] is nan"),
    (np.where(GOOD_SIMS == 0.3, -np.inf, GOOD_SIMS), GOOD_CAPTION_TO_IMAGE, r"sims\[0, 2\] is -inf"),
    (np.where(GOOD_SIMS == 0.4, 1e300, GOOD_SIMS), GOOD_CAPTION_TO_IMAGE, r"sims\[1, 2\] is inf after conversion to float32"),
    (np.array([["a", "b", "c"]] * 2), GOOD_CAPTION_TO_IMAGE, r"sims must be a numeric array"),
])
def test_invalid_input_raises(function, sims, caption_to_image, message):
    with pytest.raises(ValueError, match=message):
        function(sims, caption_to_image)


@pytest.mark.parametrize("function", [i2t_ranks, retrieval_metrics, coco_1k_metrics])
def test_uncaptioned_image_raises_for_i2t(function):
    sims = np.zeros((5, 3))
    caption_to_image = np.array([0, 2, 2])
    kwargs = {"n_folds": 1, "fold_size": 5} if function is coco_1k_metrics else {}
    with pytest.raises(ValueError, match=r"3 of 5 images have no caption .*\[1, 3, 4\].*image-to-text rank is undefined"):
        function(sims, caption_to_image, **kwargs)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_invalid_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        retrieval_metrics(GOOD_SIMS, GOOD_CAPTION_TO_IMAGE, chunk_size=chunk_size)


@pytest.mark.parametrize("ks", [(), (0, 5), (1, 1), (1.5,)])
def test_invalid_ks_raises(ks):
    with pytest.raises(ValueError, match="ks must be distinct positive integers"):
        retrieval_metrics(GOOD_SIMS, GOOD_CAPTION_TO_IMAGE, ks=ks)


@pytest.mark.parametrize("n_folds,fold_size", [(0, 5), (2, 0), (1.0, 5)])
def test_coco_1k_invalid_fold_arguments_raise(n_folds, fold_size):
    with pytest.raises(ValueError, match="must be a positive integer"):
        coco_1k_metrics(GOOD_SIMS, GOOD_CAPTION_TO_IMAGE, n_folds=n_folds, fold_size=fold_size)
