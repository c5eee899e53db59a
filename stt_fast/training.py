"""Training and evaluation with the recipe of docs/model.md.

SGD (lr 0.01, momentum 0.9, weight decay 1e-4), step decay x0.1 every 40 epochs, 100 epochs, batch
32, compact softmax cross entropy; mixed precision on CUDA; the best checkpoint by the chosen metric
(WAR or UAR on the evaluation split) kept; resumable. Unreadable clips are skipped and reported, never
fatal mid-epoch.

The paper's recipe starts from a pretrained backbone. From scratch (the synthetic set, no weights to
download here), AdamW with gradient clipping trains the transformer far more reliably:
optimizer="adamw", lr=1e-3, clip_grad_norm=1.0.

Files in the run folder:
    run.json            every option of the run (TrainOptions and the caller's setup: config, data,
                        crop...): --resume continues with them and refuses options that contradict them
    best.safetensors    the best model so far (metadata: epoch and metrics)
    last.safetensors    the model after the last finished epoch
    last_state.pt       optimizer, scheduler, scaler, epoch, best metric (for --resume)
    log.jsonl           one JSON line per epoch
    confusion_best.png  the best epoch's confusion matrix
    training.png        training loss and evaluation WAR / UAR per epoch, redrawn after each epoch
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_state_strict, read_checkpoint, save_checkpoint
from .data.datasets import ClipDataset, make_loader
from .files import atomic_output, write_text_atomic
from .loss import CompactSoftmaxCrossEntropy
from .metrics import plot_confusion_matrix, plot_training_curves, summarize
from .model import STT
from .progress import progress_bar

METRICS = ("war", "uar")
OPTIMIZERS = ("sgd", "adamw")
RUN_FILE = "run.json"
# What may change when a run is resumed: how long it goes on and how its data is read, not what it learns.
CHANGEABLE_ON_RESUME = frozenset({"epochs", "workers"})


@dataclass
class TrainOptions:
    epochs: int = 100
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 40
    lr_gamma: float = 0.1
    lambda_compact: float = 0.1
    optimizer: str = "sgd"
    clip_grad_norm: float | None = None
    metric: str = "war"
    workers: int | None = None
    amp: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0, got {self.clip_grad_norm}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_step < 1:
            raise ValueError(f"lr_step must be >= 1, got {self.lr_step}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], dataset: ClipDataset, *, batch_size: int = 32,
             workers: int | None = None, progress: bool = True, desc: str = "[eval]") -> dict:
    """WAR, UAR, per-class recall and confusion matrix of predict (clips -> logits) over dataset."""
    predictions, targets, bad = [], [], []
    loader = make_loader(dataset, batch_size=batch_size, workers=workers)
    for batch in progress_bar(loader, desc=desc, enabled=progress, unit="batch"):
        bad.extend(batch["bad"])
        if batch["clips"] is None:
            continue
        with torch.no_grad():
            logits = predict(batch["clips"])
        predictions.append(logits.argmax(-1).cpu())
        targets.append(batch["labels"])
    if not predictions:
        raise ValueError("no readable clip in the evaluation set")
    result = summarize(torch.cat(predictions), torch.cat(targets))
    result["bad_clips"] = [{"path": p, "error": e} for p, e in bad]
    return result


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return torch.autocast(device.type, enabled=False), None


def read_run(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The run record of a run folder: {"options": TrainOptions fields, "setup": the caller's}."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in {out_dir}: {RUN_FILE} not found (not a run folder, or a run "
                                "from an older stt_fast)")
    try:
        record = json.loads(path.read_text())
        TrainOptions(**record["options"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a readable run record: {e}") from e
    return record


def _run_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    return [f"{key}: the run used {saved.get(key)!r}, given {value!r}" for key, value in given.items()
            if key not in CHANGEABLE_ON_RESUME and _jsonable(value) != saved.get(key)]


def _jsonable(value):
    return json.loads(json.dumps(value))  # tuples become lists, as they come back from run.json


def train(model: STT, train_set: ClipDataset, eval_set: ClipDataset, options: TrainOptions,
          out_dir: str | os.PathLike, *, device: str | torch.device | None = None, resume: bool = False,
          setup: dict[str, Any] | None = None, progress: bool = True,
          echo: Callable[[str], None] = print) -> list[dict]:
    """Train model (in place) and return the per-epoch log; see the module docstring for the files.

    setup: the caller's own facts of the run (config name, data folder, crop scale...), recorded in
    run.json beside the options. resume: continue the run in out_dir; options and setup must equal the
    recorded ones but for CHANGEABLE_ON_RESUME (ValueError naming each difference).
    """
    out = Path(out_dir)
    setup = dict(setup or {})
    if resume:
        saved = read_run(out)
        differences = _run_differences(saved["options"], dataclasses.asdict(options)) + \
            _run_differences(saved.get("setup", {}), setup)
        if differences:
            raise ValueError(f"--resume continues the run in {out} with its own options; these contradict it: "
                             + "; ".join(differences))
    elif (out / "log.jsonl").exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_text_atomic(out / RUN_FILE, json.dumps({"options": dataclasses.asdict(options), "setup": setup},
                                                      indent=2, default=str))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(options.seed)
    torch.manual_seed(options.seed)
    model.to(device)
    loss_fn = CompactSoftmaxCrossEntropy(options.lambda_compact)
    if options.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=options.lr, momentum=options.momentum,
                                    weight_decay=options.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=options.lr_step, gamma=options.lr_gamma)
    autocast, amp_dtype = _autocast(device, options.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_epoch, best, history = 1, -math.inf, []
    if resume:
        start_epoch, best = _resume(model, optimizer, scheduler, scaler, out)
        history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        echo(f"[train] resumed from {out} at epoch {start_epoch} (best {options.metric} {best:.4f})")
    loader = make_loader(train_set, batch_size=options.batch_size, workers=options.workers,
                         pin_memory=device.type == "cuda")
    for epoch in range(start_epoch, options.epochs + 1):
        model.train()
        started, seen, correct, loss_sum, bad = time.perf_counter(), 0, 0, 0.0, []
        bar = progress_bar(loader, desc=f"[train] epoch {epoch}/{options.epochs}", enabled=progress, unit="batch")
        for batch in bar:
            bad.extend(batch["bad"])
            if batch["clips"] is None:
                continue
            clips = batch["clips"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with autocast:
                logits = model(clips)
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if options.clip_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            seen += labels.numel()
            correct += (logits.argmax(-1) == labels).sum().item()
            loss_sum += loss.item() * labels.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        scheduler.step()
        model.eval()
        with autocast:
            metrics = evaluate(lambda x: model(x.to(device)), eval_set, batch_size=options.batch_size,
                               workers=options.workers, progress=progress, desc=f"[eval] epoch {epoch}")
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
                  "train_acc": correct / max(seen, 1), "war": metrics["war"], "uar": metrics["uar"],
                  "seconds": round(time.perf_counter() - started, 1),
                  "bad_clips": [{"path": p, "error": e} for p, e in bad] + metrics["bad_clips"]}
        history.append(record)
        score = metrics[options.metric]
        improved = score > best
        if improved:
            best = score
            save_checkpoint(model, out / "best.safetensors", metadata={"epoch": epoch, "war": metrics["war"],
                                                                         "uar": metrics["uar"]})
            plot_confusion_matrix(metrics["confusion_matrix"], out / "confusion_best.png",
                                  title=f"epoch {epoch}: WAR {metrics['war']:.3f}  UAR {metrics['uar']:.3f}")
        _save_last(model, optimizer, scheduler, scaler, epoch, best, out)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        plot_training_curves(history, out / "training.png", title=f"{out.name}: epoch {epoch}")
        skipped = f", {len(record['bad_clips'])} bad clips skipped" if record["bad_clips"] else ""
        echo(f"[train] epoch {epoch}: loss {record['train_loss']:.4f}, train acc {record['train_acc']:.3f}, "
             f"WAR {metrics['war']:.4f}, UAR {metrics['uar']:.4f}{' (best)' if improved else ''}, "
             f"{record['seconds']} s{skipped}")
        for item in record["bad_clips"]:
            echo(f"[train]   skipped {item['path']}: {item['error']}")
    return history


def _save_last(model, optimizer, scheduler, scaler, epoch: int, best: float, out: Path) -> None:
    save_checkpoint(model, out / "last.safetensors", metadata={"epoch": epoch})
    state = {"epoch": epoch, "best": best, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict()}
    with atomic_output(out / "last_state.pt") as tmp:
        torch.save(state, tmp)


def _resume(model, optimizer, scheduler, scaler, out: Path) -> tuple[int, float]:
    if not (out / "last_state.pt").is_file():
        raise FileNotFoundError(f"nothing to resume in {out}: last_state.pt not found")
    config, tensors, _ = read_checkpoint(out / "last.safetensors")
    if config != model.config:
        raise ValueError(f"the run in {out} used another config: {config}")
    load_state_strict(model, tensors, str(out / "last.safetensors"))
    state = torch.load(out / "last_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1, float(state["best"])
