"""DDP on two CPU processes (gloo): the global-batch loss, its gradients, stages, gathered evaluation, torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cocomix_nb.data import load_coco_split
from cocomix_nb.distributed import free_local_port, launch_local, wrap_ddp
from cocomix_nb.stage import create_stage
from cocomix_nb.train import (CachedSource, TrainingObjective, build_model, build_optimizers, embed_split,
                              make_config)
from cocomix_nb.train import main as train_main

LOCAL_BATCH = 8  # per rank; the single process gets 2 * LOCAL_BATCH


def mini_config(root, **overrides):
    # No feature dropout: the two runs must compute the same function of the same batch.
    return make_config("cpu-mini", data_root=str(root), feature_dropout=0.0, max_images=40, **overrides)


@pytest.fixture(scope="module")
def cached_val(mini_root):
    "Real cached features of 40 validation images of the mini set, and a global batch of 16 captions."
    split = load_coco_split("val", mini_root, max_images=40)
    sources = {}
    for model_type in ("global", "token"):
        sources[model_type] = CachedSource(split, mini_config(mini_root, model_type=model_type))
    # The first 16 captions are grouped by image (5 or 6 each), so images repeat inside each local batch
    # and one image has captions on both ranks: same-image masking must work across the ranks.
    order = torch.arange(2 * LOCAL_BATCH)
    image_ids = sources["global"].batch(order)["image_ids"]
    assert set(image_ids[:LOCAL_BATCH].tolist()) & set(image_ids[LOCAL_BATCH:].tolist())
    return split, sources, order


def objective_for(config, state=None):
    model = build_model(config)
    stage = create_stage(config.stage, **config.stage_params)
    if state is not None:
        model.load_state_dict(state["model"])
        stage.load_state_dict(state["stage"])
    return TrainingObjective(model, stage, config)


def gradients(module) -> dict:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def ddp_step(context, config, state, global_batch, max_violation):
    "Rank worker: DDP forward and backward on this rank's half of the global batch; loss, gradients, losses."
    torch.manual_seed(123)
    objective = objective_for(config, state)
    objective.context = context
    ddp = wrap_ddp(objective, context, torch.device("cpu"))
    rows = slice(context.rank * LOCAL_BATCH, (context.rank + 1) * LOCAL_BATCH)
    local_batch = slice_batch(global_batch, rows)
    loss, losses, _ = ddp(local_batch, max_violation)
    loss.backward()
    return {"losses": {k: v.item() for k, v in losses.items()}, "grads": gradients(objective)}


def slice_batch(batch, rows):
    if isinstance(batch, dict):
        return {key: slice_batch(value, rows) for key, value in batch.items()}
    return batch[rows]


def single_step(config, state, global_batch, max_violation):
    torch.manual_seed(123)
    objective = objective_for(config, state)
    loss, losses, _ = objective(global_batch, max_violation)
    loss.backward()
    return {"losses": {k: v.item() for k, v in losses.items()}, "grads": gradients(objective)}


@pytest.mark.parametrize("model_type,loss", [("global", "infonce"), ("global", "hinge"), ("token", "infonce")])
def test_ddp_step_equals_double_batch(cached_val, mini_root, model_type, loss):
    _, sources, order = cached_val
    config = mini_config(mini_root, model_type=model_type, loss=loss)
    torch.manual_seed(0)
    initial = objective_for(config)
    state = {"model": initial.model.state_dict(), "stage": initial.stage.state_dict()}
    global_batch = sources[model_type].batch(order)

    single = single_step(config, state, global_batch, max_violation=True)
    ranks = launch_local(ddp_step, 2, config, state, global_batch, True)

    assert single["losses"]["contrastive"] > 0.1
    for rank, result in enumerate(ranks):
        assert result["losses"]["contrastive"] == pytest.approx(single["losses"]["contrastive"], rel=1e-6, abs=1e-7), rank
        assert set(result["grads"]) == set(single["grads"]), rank
        for name, expected in single["grads"].items():
            assert expected.abs().max() > 0 or name == "model.log_logit_scale", (name, "a zero gradient proves nothing")
            # float32 sums in another order differ by rounding only; a missing or doubled part is far larger.
            torch.testing.assert_close(result["grads"][name], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(),
                                       msg=lambda message: f"rank {rank}, {name}: {message}")
    if loss == "hinge":
        assert "model.log_logit_scale" not in single["grads"]


def ddp_stage_step(context, config, state, global_batch):
    "Rank worker: one optimiser step of model and stage under DDP; returns all parameters after the step."
    torch.manual_seed(1000 + context.rank)  # ranks draw different random numbers, as in training
    objective = objective_for(config, state)
    objective.context = context
    ddp = wrap_ddp(objective, context, torch.device("cpu"))
    optimizers = build_optimizers(config, objective.model, objective.stage, total_steps=10)
    rows = slice(context.rank * LOCAL_BATCH, (context.rank + 1) * LOCAL_BATCH)
    for max_violation in (False, True):
        loss, losses, _ = ddp(slice_batch(global_batch, rows), max_violation)
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
    return {"parameters": {n: p.detach().clone() for n, p in objective.named_parameters()},
            "losses": sorted(losses)}


# The pairing stage trains only its own network and adds no pairs; the others add augmented pairs.
@pytest.mark.parametrize("variant,adds_pairs", [(dict(stage="lemda"), True), (dict(stage="pairing"), False),
                                                (dict(stage="premix"), True),
                                                (dict(stage="tokenmix", model_type="token"), True),
                                                (dict(stage="alignaware", model_type="token"), True)])
def test_stages_stay_in_sync(cached_val, mini_root, variant, adds_pairs):
    _, sources, order = cached_val
    config = mini_config(mini_root, **variant)
    torch.manual_seed(0)
    initial = objective_for(config)
    state = {"model": initial.model.state_dict(), "stage": initial.stage.state_dict()}
    global_batch = sources[config.model_type].batch(order)

    ranks = launch_local(ddp_stage_step, 2, config, state, global_batch)

    stage_parameters = [n for n in ranks[0]["parameters"] if n.startswith("stage.")]
    assert stage_parameters, "the stage has parameters, so DDP must keep them in sync"
    for name, value in ranks[0]["parameters"].items():
        torch.testing.assert_close(ranks[1]["parameters"][name], value, rtol=0, atol=0, msg=name)
    moved = [n for n in stage_parameters if not torch.equal(ranks[0]["parameters"][n], state["stage"][n[len("stage."):]])]
    assert moved, "the stage's parameters did not change in two steps"
    assert any(name.startswith("extra_pair") for name in ranks[0]["losses"]) == adds_pairs


def embed_rank(context, config, split, state):
    "Rank worker: embeddings of the whole split, each rank embedding its shard and gathering the rest."
    model = build_model(config)
    model.load_state_dict(state)
    source = CachedSource(split, config)
    return embed_split(model, source, batch_size=7, device="cpu", context=context)


def test_gathered_embeddings_equal_single(cached_val, mini_root):
    split, sources, _ = cached_val
    config = mini_config(mini_root)
    torch.manual_seed(0)
    model = build_model(config)
    expected_images, expected_texts = embed_split(model, sources["global"], batch_size=7, device="cpu")

    ranks = launch_local(embed_rank, 2, config, split, model.state_dict())

    for images, texts in ranks:
        assert images.shape == (split.n_images, 256)
        assert texts.shape == (split.n_captions, 256)
        torch.testing.assert_close(images, expected_images, rtol=0, atol=1e-6)
        torch.testing.assert_close(texts, expected_texts, rtol=0, atol=1e-6)


def test_torchrun_run_matches_one_process(mini_root, tmp_path):
    settings = ["max_images=40", "epochs=2", "batch_size=16", "feature_dropout=0.0"]
    out_dir = tmp_path / "two-ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_local_port()),
               "-m", "cocomix_nb.train", "--preset", "cpu-mini", "--data-root", str(mini_root),
               "--out-dir", str(out_dir), "--set", *settings]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    single_dir = tmp_path / "one-process"
    assert train_main(["--preset", "cpu-mini", "--data-root", str(mini_root), "--out-dir", str(single_dir),
                       "--set", *settings]) == 0

    metrics = json.loads((out_dir / "metrics.json").read_text())
    single = json.loads((single_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert single["world_size"] == 1
    assert len(metrics["history"]) == 2
    assert metrics["test"]["n_images"] == 40
    # Same global batches and no dropout: the two runs train the same model, up to float rounding.
    for epoch in range(2):
        assert metrics["history"][epoch]["loss"] == pytest.approx(single["history"][epoch]["loss"], rel=1e-4), epoch
    assert metrics["test"]["rsum"] == pytest.approx(single["test"]["rsum"], abs=1.0)

    # Rank 0 alone writes: one log file, with every epoch line once.
    log = (out_dir / "train.log").read_text()
    assert log.count("epoch 1/2") == 1, log
    assert sorted(p.name for p in out_dir.iterdir()) == ["best.pt", "checkpoint.pt", "metrics.json", "train.log"]
