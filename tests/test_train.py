"""Training loop, resume, evaluation command and the papermill training notebook on real COCO."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cocomix_nb.runner import run_grid, run_notebook
import cocomix_nb.train as train_module
from cocomix_nb.train import evaluate, make_config, train

SMALL = dict(max_images=80, batch_size=32, lr=1e-3)


def small_config(root, out_dir, **overrides):
    return make_config("cpu-mini", data_root=str(root), out_dir=str(out_dir), **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def finished_run(mini_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "baseline-0"
    return out, train(small_config(mini_root, out, epochs=3))


def test_metrics_json_contents(finished_run):
    out, metrics = finished_run
    written = json.loads((out / "metrics.json").read_text())
    assert written["test"] == metrics["test"]
    assert len(written["history"]) == 3
    assert written["n_images"] == {"train": 80, "val": 80, "test": 80}
    assert written["backbones"] == {"image": "efficientnet_lite0", "text": "minilm-l6"}
    assert written["config"]["seed"] == 0
    assert written["val"] == written["history"][written["best_epoch"]]["val"]
    for key in ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "n_captions"]:
        assert key in written["test"]


def test_training_beats_chance(finished_run):
    _, metrics = finished_run
    # Chance R@10 over 80 images is 12.5%; trained heads on real features are far above it.
    assert metrics["test"]["t2i_r10"] > 40
    assert metrics["test"]["i2t_r10"] > 40


def test_resume_matches_uninterrupted_run(mini_root, tmp_path, finished_run, monkeypatch):
    _, uninterrupted = finished_run
    out = tmp_path / "resumed"
    calls = []

    def evaluate_then_crash(*args, **kwargs):  # the second validation (epoch 1) dies, as a killed job would
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(mini_root, out, epochs=3))
    monkeypatch.setattr(train_module, "evaluate", evaluate)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 0
    resumed = train(small_config(mini_root, out, epochs=3))
    assert [r["val"] for r in resumed["history"]] == [r["val"] for r in uninterrupted["history"]]
    assert resumed["test"] == uninterrupted["test"]


def test_cold_and_warm_cache_train_identically(mini_root, tmp_path):
    cache = tmp_path / "cache"
    cold = train(small_config(mini_root, tmp_path / "cold", epochs=1, max_images=30, cache_dir=str(cache)))
    warm = train(small_config(mini_root, tmp_path / "warm", epochs=1, max_images=30, cache_dir=str(cache)))
    assert cold["history"][0]["loss"] == warm["history"][0]["loss"]
    assert cold["test"] == warm["test"]


def test_different_seeds_differ(mini_root, tmp_path, finished_run):
    _, seed0 = finished_run
    seed1 = train(small_config(mini_root, tmp_path / "seed1", epochs=3, seed=1))
    assert seed1["history"][0]["loss"] != seed0["history"][0]["loss"]


def test_eval_command_reproduces_test_metrics(finished_run, mini_root, tmp_path):
    out, metrics = finished_run
    command = Path(sys.executable).parent / "cocomix-eval"  # the console script installed with the package
    result = subprocess.run([str(command), str(out / "best.pt"),
                             "--data-root", str(mini_root), "--split", "test", "--max-images", "80",
                             "--out", str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    scored = json.loads((tmp_path / "eval.json").read_text())
    for key in ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r10", "rsum", "i2t_medr"]:
        assert scored[key] == pytest.approx(metrics["test"][key], abs=1e-9)
    assert "rsum=" in result.stdout


def test_hinge_loss_trains(mini_root, tmp_path):
    metrics = train(small_config(mini_root, tmp_path / "hinge", epochs=2, loss="hinge", lr=1e-3))
    assert metrics["test"]["rsum"] > 150


def test_batch_larger_than_data_rejected(mini_root, tmp_path):
    with pytest.raises(ValueError, match="batch_size=4096"):
        train(small_config(mini_root, tmp_path / "big", epochs=1, batch_size=4096))


def test_papermill_smoke_run(mini_root, tmp_path):
    metrics = run_notebook(tmp_path / "baseline-0", dict(preset="cpu-mini", data_root=str(mini_root), epochs=1,
                                                         max_images=40, batch_size=16))
    assert (tmp_path / "baseline-0" / "train.ipynb").is_file()
    assert (tmp_path / "baseline-0" / "best.pt").is_file()
    assert metrics["test"]["n_images"] == 40
    assert metrics["config"]["out_dir"] == str((tmp_path / "baseline-0").resolve())


def test_grid_rejects_unknown_parameter_before_running(tmp_path):
    with pytest.raises(ValueError, match="epochz"):
        run_grid("x", ["baseline"], [0], {"epochz": 3}, out_root=tmp_path)
    assert not (tmp_path / "x").exists()


def test_grid_rejects_wrong_type(tmp_path):
    with pytest.raises(ValueError, match="epochs='3'"):
        run_grid("x", ["baseline"], [0], {"epochs": "3"}, out_root=tmp_path)


def test_grid_survives_failure_and_skips_finished(mini_root, tmp_path):
    parameters = dict(preset="cpu-mini", data_root=str(mini_root), epochs=1, max_images=40, batch_size=16)
    results, failures = run_grid("grid", ["no-such-stage", "token_baseline"], [0], parameters, out_root=tmp_path)
    assert list(failures) == ["no-such-stage-0"]
    assert list(results) == ["token_baseline-0"]
    assert results["token_baseline-0"]["config"]["model_type"] == "token"
    assert (tmp_path / "grid" / "no-such-stage-0" / "error.txt").is_file()
    stamp = (tmp_path / "grid" / "token_baseline-0" / "metrics.json").stat().st_mtime
    again, _ = run_grid("grid", ["token_baseline"], [0], parameters, out_root=tmp_path)
    assert (tmp_path / "grid" / "token_baseline-0" / "metrics.json").stat().st_mtime == stamp
    assert again["token_baseline-0"]["test"] == results["token_baseline-0"]["test"]


def test_finetune_mode_updates_backbones(mini_root, tmp_path):
    from cocomix_nb.backbones import create_text_backbone
    metrics = train(small_config(mini_root, tmp_path / "finetune", mode="finetune", epochs=1, max_images=24,
                                 batch_size=8, backbone_lr=1e-4, eval_batch_size=32))
    state = torch.load(tmp_path / "finetune" / "best.pt", weights_only=False)["model"]
    assert any(key.startswith("image_backbone.") for key in state)
    pretrained = create_text_backbone("minilm-l6").encoder.state_dict()
    name = "encoder.layer.5.output.dense.weight"
    assert not torch.equal(state[f"text_backbone.encoder.{name}"], pretrained[name])
    assert metrics["test"]["n_images"] == 24
