"""A tiny STT trained on the synthetic set, so that WAR/UAR parity between backends is measured on a model
that has learned something. Built on first use and cached (data set and checkpoint)."""

from __future__ import annotations

from pathlib import Path

from stt_fast.config import get_config
from stt_fast.files import cache_root


def synthetic_checkpoint(config_name: str = "tiny", *, root: Path | None = None, epochs: int = 30,
                         progress: bool = True) -> tuple[Path, Path]:
    """(data root, checkpoint) of a config_name model trained on fold 1 of the synthetic set."""
    from stt_fast.data.datasets import ClipDataset, dfew_items
    from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew
    from stt_fast.model import STT
    from stt_fast.training import TrainOptions, train

    root = root or cache_root("synthetic")
    data = root / "data"
    if not (data / "EmoLabel_DataSplit").is_dir():
        write_synthetic_dfew(data, SynthConfig(), progress=progress)
    run = root / f"run-{config_name}-{epochs}"
    checkpoint = run / "best.safetensors"
    if not checkpoint.is_file():
        config = get_config(config_name)
        common = dict(num_frames=config.num_frames, image_size=config.image_size)
        train_set = ClipDataset(dfew_items(data, 1, "train"), train=True, skip_bad=True, crop_scale=(0.5, 1.0),
                                **common)
        test_set = ClipDataset(dfew_items(data, 1, "test"), train=False, **common)
        options = TrainOptions(epochs=epochs, lr_step=round(0.7 * epochs), batch_size=16, optimizer="adamw", lr=1e-3,
                               weight_decay=0.05, clip_grad_norm=1.0)
        train(STT(config), train_set, test_set, options, run, progress=progress, resume=(run / "log.jsonl").exists())
    return data, checkpoint


def labelled_test_set(data: Path, config, fold: int = 1):
    from stt_fast.data.datasets import ClipDataset, dfew_items

    return ClipDataset(dfew_items(data, fold, "test"), train=False, num_frames=config.num_frames,
                       image_size=config.image_size)
