"""Training: learns the synthetic set well above chance, resumes, and survives bad clips."""

import json

import pytest
import torch

from stt_fast import STT, get_config, load_checkpoint
from stt_fast.checkpoint import read_checkpoint
from stt_fast.cli import main
from stt_fast.data.datasets import ClipDataset, ClipItem, dfew_items
from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew
from stt_fast.training import TrainOptions, evaluate, train

CHANCE = 1 / 7


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return write_synthetic_dfew(tmp_path_factory.mktemp("synth"), SynthConfig(clips_per_class=60), progress=False)


def datasets(root, config, fold=1):
    common = dict(num_frames=config.num_frames, image_size=config.image_size)
    return (ClipDataset(dfew_items(root, fold, "train"), train=True, skip_bad=True, crop_scale=(0.5, 1.0), **common),
            ClipDataset(dfew_items(root, fold, "test"), train=False, **common))


# From scratch (no pretrained backbone here), AdamW with gradient clipping; see stt_fast.training.
FROM_SCRATCH = dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, clip_grad_norm=1.0, batch_size=16, workers=2)


@pytest.mark.slow
def test_short_training_run_beats_chance_by_a_wide_margin(synth_root, tmp_path):
    config = get_config("tiny")
    train_set, test_set = datasets(synth_root, config)
    history = train(STT(config), train_set, test_set, TrainOptions(epochs=20, lr_step=14, **FROM_SCRATCH),
                    tmp_path / "run", progress=False, echo=lambda line: None)
    best = max(r["war"] for r in history)
    assert best > 2.5 * CHANCE, f"best WAR {best:.3f}"
    # the kept checkpoint is the best epoch's, and evaluating it reproduces that epoch's numbers
    model = load_checkpoint(tmp_path / "run" / "best.safetensors")
    result = evaluate(model, test_set, progress=False, workers=0)
    assert result["war"] == pytest.approx(best)
    assert (tmp_path / "run" / "confusion_best.png").is_file()
    from PIL import Image

    with Image.open(tmp_path / "run" / "training.png") as curve:  # loss and WAR / UAR per epoch
        assert curve.format == "PNG" and curve.size[0] > curve.size[1] > 200


def test_resume_continues_where_the_run_stopped(synth_root, tmp_path):
    config = get_config("tiny-joint")
    train_set, test_set = datasets(synth_root, config)
    train_set.items, test_set.items = train_set.items[:24], test_set.items[:14]
    options = dict(batch_size=8, workers=0, lr_step=1, lr_gamma=0.5)
    train(STT(config), train_set, test_set, TrainOptions(epochs=2, **options), tmp_path, progress=False,
          echo=lambda line: None)
    with pytest.raises(ValueError, match="--resume"):
        train(STT(config), train_set, test_set, TrainOptions(epochs=3, **options), tmp_path, progress=False)
    restored = STT(config)  # nothing left to run at epochs=2: the model must come back as saved
    train(restored, train_set, test_set, TrainOptions(epochs=2, **options), tmp_path, resume=True, progress=False,
          echo=lambda line: None)
    _, saved, _ = read_checkpoint(tmp_path / "last.safetensors")
    assert all(torch.equal(value.cpu(), saved[key]) for key, value in restored.state_dict().items())
    lines = []
    history = train(STT(config), train_set, test_set, TrainOptions(epochs=3, **options), tmp_path, resume=True,
                    progress=False, echo=lines.append)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert "resumed" in lines[0] and "at epoch 3" in lines[0]
    assert history[2]["lr"] == pytest.approx(0.01 * 0.5**3), "the scheduler state was restored"
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


def test_bad_clips_are_skipped_and_reported(synth_root, tmp_path):
    config = get_config("tiny")
    train_set, test_set = datasets(synth_root, config)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    train_set.items = [*train_set.items[:15], ClipItem(broken, 3)]
    test_set.items = test_set.items[:7]
    lines = []
    history = train(STT(config), train_set, test_set, TrainOptions(epochs=1, batch_size=8, workers=0),
                    tmp_path / "run", progress=False, echo=lines.append)
    assert [b["path"] for b in history[0]["bad_clips"]] == [str(broken)]
    assert any("skipped" in line and "broken.mp4: unreadable video" in line for line in lines)
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert logged["bad_clips"][0]["path"] == str(broken)


def test_cli_train_and_eval(synth_root, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", str(synth_root), "--config", "tiny", "-o", str(run), "--epochs", "1", "--batch-size", "16",
            "--workers", "0", "--optimizer", "adamw", "--lr", "1e-3", "--crop-scale", "0.5:1", "--fold", "2"]
    assert main(args) == 0
    assert {"best.safetensors", "last.safetensors", "last_state.pt", "log.jsonl"} <= {p.name for p in run.iterdir()}
    capsys.readouterr()
    assert main(["eval", str(synth_root), "--fold", "2", "--checkpoint", str(run / "best.safetensors"),
                 "--workers", "0", "--json", "--confusion-png", str(tmp_path / "cm.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 84 and 0 <= result["war"] <= 1 and (tmp_path / "cm.png").is_file()
    assert torch.tensor(result["confusion_matrix"]).sum() == 84
