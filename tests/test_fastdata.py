"""The fast data path on real COCO: seeded LiveSource workers and a pre-resized COCO folder."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cocomix_nb.backbones import create_text_backbone
from cocomix_nb.data import load_coco_split
from cocomix_nb.distributed import DistributedContext
from cocomix_nb.fastdata import resize_folder
from cocomix_nb.train import LiveSource, make_config


@pytest.fixture(scope="module")
def tokenize():
    return create_text_backbone("minilm-l6").tokenize


def epoch_images(split, tokenize, epoch, seed=0, rank=0, num_workers=2):
    "Images of the first two training batches of `epoch`, as a fresh LiveSource's DataLoader workers produce them."
    config = make_config("cpu-mini", mode="finetune", num_workers=num_workers, seed=seed, device="cpu")
    context = DistributedContext(rank, 2, rank) if rank else DistributedContext()
    source = LiveSource(split, config, tokenize, context=context)
    order = torch.arange(split.n_captions)
    batches = source.train_batches(order, 8, context, epoch)
    return [next(batches)["image"] for _ in range(2)]


def test_live_batches_are_uint8_crops(mini_root, tokenize):
    split = load_coco_split("val", mini_root, max_images=8)
    images = epoch_images(split, tokenize, epoch=0)[0]
    assert images.dtype == torch.uint8
    assert images.shape == (8, 3, 224, 224)


def test_live_crops_repeat_per_seed_and_epoch(mini_root, tokenize):
    split = load_coco_split("val", mini_root, max_images=8)
    first = epoch_images(split, tokenize, epoch=0)
    again = epoch_images(split, tokenize, epoch=0)
    next_epoch = epoch_images(split, tokenize, epoch=1)
    other_seed = epoch_images(split, tokenize, epoch=0, seed=1)

    for batch, repeated in zip(first, again):
        assert torch.equal(batch, repeated)
    assert not torch.equal(first[0], next_epoch[0])
    assert not torch.equal(first[0], other_seed[0])
    # The two workers load the two batches with different random crops of the same 8 captions' images.
    assert not torch.equal(first[0], first[1])


def test_live_source_reuses_loader_across_epochs(mini_root, tokenize):
    split = load_coco_split("val", mini_root, max_images=8)
    config = make_config("cpu-mini", mode="finetune", num_workers=0, device="cpu")
    source = LiveSource(split, config, tokenize)
    order = torch.arange(split.n_captions)
    first_epoch = list(source.train_batches(order, 8, epoch=0))
    loader = source._train_loader
    second_epoch = list(source.train_batches(order.flip(0), 8, epoch=1))

    assert source._train_loader is loader
    assert len(first_epoch) == split.n_captions // 8
    assert first_epoch[0]["caption_index"].tolist() == list(range(8))
    assert second_epoch[0]["caption_index"].tolist() == order.flip(0)[:8].tolist()


def test_resized_coco_folder_loads(mini_root, tmp_path):
    split = load_coco_split("val", mini_root, max_images=12)
    source_root = tmp_path / "original"
    (source_root / "images" / "val2017").mkdir(parents=True)
    shutil.copytree(mini_root / "annotations", source_root / "annotations")
    (source_root / "split.json").write_text(json.dumps({"val": split.image_ids}))
    for path in split.image_paths:
        target = source_root / "images" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)

    resized_root = tmp_path / "resized"
    shutil.copytree(source_root, resized_root, ignore=shutil.ignore_patterns("images"))
    summary = resize_folder(source_root / "images", resized_root / "images", short_side=128, workers=1)
    resized = load_coco_split("val", resized_root)

    assert summary["failed"] == {}
    assert summary["resized"] == 12
    assert resized.image_ids == split.image_ids
    assert resized.captions == split.captions
    for original_path, resized_path in zip(split.image_paths, resized.image_paths):
        assert resized_path.name == original_path.name
        with Image.open(original_path) as original, Image.open(resized_path) as small:
            assert min(small.size) == 128
            assert small.mode == original.mode
            # Aspect ratio kept to within the rounding of the long side.
            assert abs(small.size[0] / small.size[1] - original.size[0] / original.size[1]) < 0.01
            # The content is the original's, scaled: compare with an independent PIL resize (box filter,
            # where resize_folder uses Lanczos).
            reference = original.convert("RGB").resize(small.size, Image.Resampling.BOX)
            difference = np.abs(np.asarray(small.convert("RGB"), dtype=float) - np.asarray(reference, dtype=float))
            assert difference.mean() < 8, resized_path.name

    # The tolerance separates images: the first resized image against the second original is far off.
    with Image.open(resized.image_paths[0]) as small, Image.open(split.image_paths[1]) as other:
        reference = other.convert("RGB").resize(small.size, Image.Resampling.BOX)
        difference = np.abs(np.asarray(small.convert("RGB"), dtype=float) - np.asarray(reference, dtype=float))
    assert difference.mean() > 20
