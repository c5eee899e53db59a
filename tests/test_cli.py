"""The stt-fast command line as a user meets it: help and version, one clean line and status 2 for every
bad option (through the real entry point), resume with the run's own options, no silent overwrite, a bad
file that does not stop the others, warnings for clips far below the model's input, results outside the
source tree, every backend of predict and eval, and extras that cover each command's imports."""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stt_fast import get_config, save_checkpoint
from stt_fast.cli import main
from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew
from tests.helpers import trained_looking

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINT = Path(sys.executable).with_name("stt-fast")


def stt_fast(*args, cwd=None, env=None):
    """The real `stt-fast` console script (as installed), in a fresh process."""
    assert ENTRY_POINT.is_file(), f"the console script is not installed beside {sys.executable}"
    environment = {**os.environ, **(env or {})}
    environment.pop("STT_FAST_DEBUG", None)
    return subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, cwd=cwd, env=environment,
                          timeout=300)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return write_synthetic_dfew(tmp_path_factory.mktemp("synth") / "data",
                                SynthConfig(clips_per_class=5, video_fraction=0.3, seed=1), progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(trained_looking(get_config("tiny")), tmp_path_factory.mktemp("ckpt") / "m.safetensors")


@pytest.mark.parametrize("args,prog", [(["bench", "report", "--bogus"], "stt-fast bench report"),
                                       (["predict", "x.mp4", "--bogus"], "stt-fast predict"),
                                       (["kernels", "plan", "--bogus"], "stt-fast kernels plan")])
def test_unknown_options_are_named_by_their_command(args, prog, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"{prog}: error: unrecognized arguments: --bogus")
    assert len(err.strip().splitlines()) == 1


def _all_parsers():
    """(name, parser) of every command and subcommand."""
    from stt_fast.cli import build_parser

    found = []
    for name, command in build_parser().commands.items():
        found.append((name, command))
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [(f"{name} {sub}", parser) for sub, parser in action.choices.items()]
    return found


@pytest.mark.parametrize("name,parser", _all_parsers(), ids=[n for n, _ in _all_parsers()])
def test_every_help_states_each_default_once_in_words(name, parser):
    """(Mutation: argparse's ArgumentDefaultsHelpFormatter appends "(default: None)" to help that already
    names its default, and prints lists and tuples as Python reprs.)"""
    text = parser.format_help()
    assert text.startswith(f"usage: stt-fast {name}") and "[options] report" not in text, text.splitlines()[0]
    for bad in ("(default: None)", "(default: False)", "default: [", "default: (", "default: {"):
        assert bad not in text, bad
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            rendered = formatter._get_help_string(action)
            assert rendered.count("default") <= 1, rendered


def test_info_json(capsys):
    assert main(["info", "--config", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["embed_dim"] == 32
    assert report["tokens"]["sequence_length"] == 1 + 4 * 16
    assert report["parameters"] > 0 and report["gflops_per_clip"] > 0
    assert report["environment"]["torch"]


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "L=785" in out and "FLOPs per clip" in out and "torch" in out


def test_help_and_version(capsys):
    import stt_fast

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"stt-fast {stt_fast.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "only parses" not in text and "Spatio-Temporal Transformer" in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "stt-fast bench report [RESULTS]" in text and "subcommand (optional)" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for shown in ("--epochs EPOCHS train until this epoch (default: 100)", "learning rate (default: 0.01)",
                  "clips per batch (default: 32)"):
        assert shown in text


BAD_OPTIONS = {
    "info-unknown-config": (["info", "--config", "huge"], "invalid choice"),
    "export-missing-checkpoint": (["export", "nope.safetensors", "-o", "m.onnx"], "checkpoint not found"),
    "export-no-output": (["export", "nope.safetensors"], "-o/--output"),
    "export-bad-batch": (["export", "nope.safetensors", "-o", "m.onnx", "--batch", "8:1:2"], "min <= opt <= max"),
    "build-bad-level": (["build", "m.onnx", "-o", "m.engine", "--opt-level", "9"], "invalid choice"),
    "check-missing-args": (["check"], "required"),
    "triton-repo-missing-model": (["triton-repo", "nope.onnx", "-o", "repo"], "nope.onnx"),
    "bench-batch-zero": (["bench", "--batch-sizes", "0"], "positive integers"),
    "bench-batch-not-a-number": (["bench", "--batch-sizes", "1,x"], "positive integers"),
    "bench-unknown-backend": (["bench", "--backends", "warp-drive"], "unknown backends"),
    "bench-report-nothing": (["bench", "report", "no-results-here"], "no benchmark results"),
    "train-zero-epochs": (["train", "data", "-o", "run", "--epochs", "0"], "positive integer"),
    "train-bad-crop": (["train", "data", "-o", "run", "--crop-scale", "2:1"], "MIN:MAX"),
    "train-negative-lr": (["train", "data", "-o", "run", "--lr", "-1"], "positive number"),
    "train-missing-data": (["train", "no-such-data", "-o", "run"], "not found"),
    "eval-missing-checkpoint": (["eval", "no-such-data"], "needs --checkpoint"),
    "predict-no-checkpoint": (["predict", "clip.mp4"], "needs --checkpoint"),
    "synth-zero-clips": (["synth", "out", "--clips-per-class", "0"], "positive integer"),
    "synth-fraction-above-1": (["synth", "out", "--video-fraction", "2"], "[0, 1]"),
    "unknown-command": (["fly"], "invalid choice"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_give_one_line_and_status_2(case, tmp_path):
    args, message = BAD_OPTIONS[case]
    result = stt_fast(*args, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0]
    assert lines[0].startswith("stt-fast")


def _train_args(data, run, *extra):
    return ["train", str(data), "--config", "tiny", "-o", str(run), "--batch-size", "16", "--workers", "0",
            "--quiet", *extra]


def test_resume_continues_with_the_runs_own_options(synth_root, tmp_path):
    run = tmp_path / "run"
    first = stt_fast(*_train_args(synth_root, run, "--epochs", "1", "--optimizer", "adamw", "--lr", "1e-3",
                                  "--clip-grad", "1", "--crop-scale", "0.5:1"))
    assert first.returncode == 0, first.stderr
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["options"]["optimizer"] == "adamw" and recorded["setup"]["crop_scale"] == [0.5, 1.0]
    # the options are not given again: they come from the run (before, it resumed with SGD and crashed)
    resumed = stt_fast("train", str(synth_root), "-o", str(run), "--resume", "--epochs", "2", "--workers", "0",
                       "--quiet")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2]
    contradicted = stt_fast("train", str(synth_root), "-o", str(run), "--resume", "--epochs", "3", "--optimizer",
                            "sgd", "--quiet")
    assert contradicted.returncode == 2 and contradicted.stderr.count("\n") == 1
    assert "optimizer: the run used 'adamw', given 'sgd'" in contradicted.stderr
    again = stt_fast(*_train_args(synth_root, run, "--epochs", "1"))  # a run is there: never replaced
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_synth_refuses_a_non_empty_folder_and_force_replaces_it_whole(tmp_path):
    out = tmp_path / "data"
    assert stt_fast("synth", str(out), "--clips-per-class", "3", "--quiet").returncode == 0
    before = sorted(p.name for p in (out / "Clip" / "clip_224x224").iterdir())
    refused = stt_fast("synth", str(out), "--clips-per-class", "1", "--quiet")
    assert refused.returncode == 2 and "not empty; pass --force" in refused.stderr
    assert sorted(p.name for p in (out / "Clip" / "clip_224x224").iterdir()) == before, "refused means untouched"
    forced = stt_fast("synth", str(out), "--clips-per-class", "1", "--video-fraction", "0", "--quiet", "--force")
    assert forced.returncode == 0
    clips = sorted(p.name for p in (out / "Clip" / "clip_224x224").iterdir())
    assert clips == [f"{i:05d}" for i in range(1, 8)], "no clip of the old set is left behind"
    assert not list((out / "Clip" / "original").iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["data"], "no partial folder is left beside it"
    (out / "notes.txt").write_text("mine")
    foreign = stt_fast("synth", str(out), "--clips-per-class", "1", "--quiet", "--force")
    assert foreign.returncode == 2 and "not replacing it" in foreign.stderr and (out / "notes.txt").is_file()


def _tiny_clip_folder(path, frames=2, size=16):
    path.mkdir()
    for k in range(frames):
        Image.fromarray(np.full((size, size, 3), 40 * k, dtype=np.uint8)).save(path / f"{k:03d}.png")
    return path


def test_predict_reports_bad_files_goes_on_and_warns_of_tiny_clips(synth_root, checkpoint, tmp_path):
    good = next((synth_root / "Clip" / "clip_224x224").iterdir())
    video = next((synth_root / "Clip" / "original").glob("*.mp4"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    tiny = _tiny_clip_folder(tmp_path / "tiny", frames=1)  # the tiny model takes 4 frames of 64 x 64
    result = stt_fast("predict", str(good), str(bad), str(video), str(tiny), "--checkpoint", str(checkpoint),
                      "--json", "--batch-size", "2", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(good), str(bad), str(video), str(tiny)]
    assert "unreadable video" in lines[1]["error"] and "label" not in lines[1]
    for line in (lines[0], lines[2], lines[3]):
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert line["label"] == max(line["probabilities"], key=line["probabilities"].get)
    assert lines[0]["warnings"] == [] and lines[2]["warnings"] == []
    assert any("1 frame(s)" in w for w in lines[3]["warnings"]) and any("16x16" in w for w in lines[3]["warnings"])
    assert "warning: " + str(tiny) in result.stderr and "1 of 4 path(s) could not be read" in result.stderr
    single = stt_fast("predict", str(good), "--checkpoint", str(checkpoint), "--json", "--device", "cpu")
    assert single.returncode == 0 and json.loads(single.stdout)["path"] == str(good)


def test_predict_with_face_detection_goes_on_past_a_clip_without_a_face(synth_root, checkpoint, monkeypatch, capsys):
    """OpenCV's cascade finds no face in the drawn faces: a detector that finds one in the first clip only."""
    from stt_fast.data import face

    clips = sorted((synth_root / "Clip" / "clip_224x224").iterdir())[:2]
    first_frames = {p.name for p in clips[0].iterdir()}
    seen = []

    def detector_factory():
        def detect(rgb):
            seen.append(len(seen))
            return [(8, 8, 40, 40)] if len(seen) <= 4 else []  # the first clip's 4 probes find a face

        return detect

    monkeypatch.setattr(face, "haar_detector", detector_factory)
    assert first_frames
    outcomes = {}
    for choice in ("full", "skip", "error"):
        seen.clear()
        code = main(["predict", str(clips[0]), str(clips[1]), "--checkpoint", str(checkpoint), "--detect-face",
                     "--no-face", choice, "--json", "--device", "cpu", "--quiet"])
        out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert "label" in out[0] and out[0]["warnings"] == []
        outcomes[choice] = (code, out[1])
    code, second = outcomes["full"]  # the default: the full frames, with a warning
    assert code == 0 and second["label"] and "no face found: the full frames were used" in second["warnings"]
    code, second = outcomes["skip"]
    assert code == 0 and "no face found" in second["skipped"] and "label" not in second
    code, second = outcomes["error"]
    assert code == 2 and "no face found" in second["error"]


@pytest.mark.parametrize("backend", ["reference", "compiled", "onnx"])
def test_eval_and_predict_with_each_backend(synth_root, checkpoint, backend, tmp_path, capsys):
    options = ["--backend", backend, "--device", "cpu", "--quiet"]
    if backend == "onnx":
        onnx = tmp_path / "m.onnx"
        assert main(["export", str(checkpoint), "-o", str(onnx), "--quiet"]) == 0
        options += ["--onnx", str(onnx)]
    else:
        options += ["--checkpoint", str(checkpoint)]
    capsys.readouterr()
    assert main(["eval", str(synth_root), "--workers", "0", "--json", *options]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 7 and torch_sum(result["confusion_matrix"]) == 7
    clip = next((synth_root / "Clip" / "clip_224x224").iterdir())
    assert main(["predict", str(clip), "--json", *options]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["path"] == str(clip) and line["label"] in line["probabilities"]
    reference = {}
    if backend != "reference":
        main(["predict", str(clip), "--json", "--checkpoint", str(checkpoint), "--device", "cpu", "--quiet"])
        reference = json.loads(capsys.readouterr().out)
        for name, p in line["probabilities"].items():
            assert p == pytest.approx(reference["probabilities"][name], abs=1e-4)


def torch_sum(matrix):
    return sum(sum(row) for row in matrix)


def test_export_refuses_to_replace_without_force(checkpoint, tmp_path, capsys):
    onnx = tmp_path / "m.onnx"
    onnx.write_text("a user's file")
    assert main(["export", str(checkpoint), "-o", str(onnx), "--quiet"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and onnx.read_text() == "a user's file"


def test_bench_writes_outside_the_source_tree_by_default(tmp_path):
    result = stt_fast("bench", "--config", "tiny", "--batch-sizes", "1", "--backends", "eager-fp32",
                      "--min-seconds", "0.01", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = list((tmp_path / "results").rglob("*.json"))
    assert len(written) == 1 and f"result written to results/{written[0].parent.name}/" in result.stdout
    assert result.stderr == "", "--quiet: no progress bars, no stage messages"


def test_bench_report_does_what_the_readme_says(tmp_path):
    """README: `stt-fast bench report benchmarks/results --markdown ... --plots ...` regenerates the page."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"`(stt-fast bench report benchmarks/results [^`]+)`", readme)
    assert command, "README names the command that regenerates the results page"
    args = command.group(1).split()[1:]
    written = {"benchmarks/results/README.md": str(tmp_path / "report.md"),
               "benchmarks/results/plots": str(tmp_path / "plots")}
    args = [written.get(a, a) for a in args]
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    result = stt_fast(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.md").read_text().startswith("### ")
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"accuracy.png", "latency_vs_batch.png",
                                                               "speedup.png"}


def test_report_and_confusion_png_never_replace_files_without_force(synth_root, checkpoint, tmp_path):
    """(Mutation: `bench report --markdown F --plots DIR` and `eval --confusion-png F` replaced them.)"""
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "results")
    markdown, plots = tmp_path / "mine.md", tmp_path / "plots"
    markdown.write_text("my notes")
    result = stt_fast("bench", "report", str(tmp_path / "results"), "--markdown", str(markdown), "--plots", str(plots))
    assert result.returncode == 2 and "exists; pass --force" in result.stderr and markdown.read_text() == "my notes"
    assert not plots.exists(), "nothing written when the command is refused"
    forced = stt_fast("bench", "report", str(tmp_path / "results"), "--markdown", str(markdown), "--plots", str(plots),
                      "--force")
    assert forced.returncode == 0 and markdown.read_text().startswith("### ")
    again = stt_fast("bench", "report", str(tmp_path / "results"), "--plots", str(plots))
    assert again.returncode == 2 and "latency_vs_batch.png exists" in again.stderr
    png = tmp_path / "cm.png"
    png.write_bytes(b"my picture")
    result = stt_fast("eval", str(synth_root), "--checkpoint", str(checkpoint), "--device", "cpu",
                      "--confusion-png", str(png), "--quiet")
    assert result.returncode == 2 and "cm.png exists" in result.stderr and png.read_bytes() == b"my picture"


# --- extras: every command's imports are covered by the extras README names for it ----------------------

def _readme_extras() -> dict[str, set[str]]:
    """README's table: command -> the extras it names for it."""
    table = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\|\s*`stt-fast ([\w-]+)[^`]*`\s*\|\s*([^|]*)\|", line)
        if match:
            table[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    return table


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[\s;<>=!\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"cv2": "opencv-python-headless", "PIL": "pillow", "av": "av"}
# modules that compiled extensions import while stt_fast's frame is the innermost Python one (the recorder
# cannot tell): module -> the distribution that really imports it
IMPORTED_BY_EXTENSIONS = {"pandas": "pyarrow"}

# Runs one command with an import recorder: every third-party module that stt_fast's own code imports
# (directly, not through another package) and that was there to import.
RECORDER = r"""
import json, sys

class Recorder:
    found = set()

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ("stt_fast", "__main__") or top.startswith("_"):
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
            frame = frame.f_back
        if frame is not None and frame.f_globals.get("__name__", "").startswith("stt_fast"):
            Recorder.found.add(top)
        return None

sys.meta_path.insert(0, Recorder())
from stt_fast.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print("IMPORTS " + json.dumps(sorted(m for m in Recorder.found if m in sys.modules)))
"""


def _command_runs(tmp: Path, synth_root: Path, checkpoint: Path, busy_port: int) -> dict[str, list[str]]:
    """A small real run of every command (those needing TensorRT run until TensorRT is asked for; serve
    until it finds its port taken, after importing what it serves with)."""
    clip = str(next((synth_root / "Clip" / "clip_224x224").iterdir()))
    onnx = tmp / "m.onnx"
    return {
        "info": ["info", "--config", "tiny"],
        "synth": ["synth", str(tmp / "synth"), "--clips-per-class", "1", "--quiet"],
        "train": _train_args(synth_root, tmp / "run", "--epochs", "1"),
        "eval": ["eval", str(synth_root), "--checkpoint", str(checkpoint), "--workers", "0", "--device", "cpu",
                 "--confusion-png", str(tmp / "cm.png"), "--quiet"],
        "predict": ["predict", clip, "--checkpoint", str(checkpoint), "--device", "cpu", "--quiet"],
        "export": ["export", str(checkpoint), "-o", str(onnx), "--fp16", "--quiet"],
        "build": ["build", str(onnx), "-o", str(tmp / "m.engine"), "--quiet"],
        "check": ["check", str(tmp / "m.engine"), str(checkpoint)],
        "triton-repo": ["triton-repo", str(onnx), "-o", str(tmp / "repo")],
        "bench": ["bench", "--config", "tiny", "--batch-sizes", "1", "--backends", "eager-fp32,stt_fast-fp32",
                  "--min-seconds", "0.01", "--output", str(tmp / "results"), "--quiet"],
        "kernels": ["kernels", "aot", "--targets", "sm_90", "--dtypes", "fp16", "--config", "tiny", "--quiet"],
        "selftest": ["selftest", "--config", "tiny", "--quick", "--output", str(tmp / "selftest"), "--quiet"],
        "annotate": ["annotate", str(synth_root), "--checkpoint", str(checkpoint), "-o", str(tmp / "annotated"),
                     "--device", "cpu", "--quiet"],
        "cache": ["cache", "list"],
        "quantize": ["quantize", str(checkpoint), "-o", str(tmp / "m.int8.onnx"), "--calibration", str(synth_root),
                     "--clips", "4", "--quiet"],
        "serve": ["serve", "--checkpoint", str(checkpoint), "--port", str(busy_port), "--quiet"],
        "timeline": ["timeline", clip, "--checkpoint", str(checkpoint), "--device", "cpu", "--window", "0.5",
                     "--stride", "0.25", "--plot", str(tmp / "timeline.png"), "--quiet"],
    }


@pytest.mark.slow
def test_every_command_imports_only_what_its_extras_install(synth_root, checkpoint, tmp_path):
    from stt_fast.cli import build_parser

    core, extras = _requirements()
    documented = _readme_extras()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    runs = _command_runs(tmp_path, synth_root, checkpoint, busy.getsockname()[1])
    assert set(build_parser().commands) <= set(runs), "every command is exercised here"
    assert set(runs) <= set(documented), f"README names no extras for {set(runs) - set(documented)}"
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs them
    for name, args in runs.items():
        result = subprocess.run([sys.executable, "-c", RECORDER, *args], capture_output=True, text=True, timeout=900,
                                env=environment)
        imported = json.loads(result.stdout.rsplit("IMPORTS ", 1)[1])
        installed = set(core) | {"torch"}
        for extra in documented[name]:
            assert extra in extras, f"README names an extra {extra!r} for {name} that pyproject lacks"
            installed |= extras[extra]
        for module in imported:
            distribution = IMPORTED_BY_EXTENSIONS.get(module) or DISTRIBUTIONS.get(module, module)
            distribution = distribution.lower().replace("_", "-")
            assert distribution in installed, (f"stt-fast {name} imports {module}, which README's extras for it "
                                               f"({sorted(documented[name]) or 'none'}) do not install")


def test_export_exits_1_when_the_graph_does_not_match_the_reference(checkpoint, tmp_path, monkeypatch, capsys):
    """The parity check decides the exit status: an exported graph computing something else fails it."""
    from stt_fast.export import onnx_export

    original = onnx_export.export_program

    def wrong_program(model, **kwargs):
        program = original(model, **kwargs)
        with torch.no_grad():
            program.head.bias.add_(1.0)  # every logit moved: the graph no longer computes the model
        return program

    monkeypatch.setattr(onnx_export, "export_program", wrong_program)
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "parity with the reference: FAILED" in out
    assert json.loads((tmp_path / "m.onnx.parity.json").read_text())["passed"] is False


def test_export_shows_its_stages(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[export] fp32 graph ->" in out and "exported in" in out and "simplified with" in out


def test_progress_bars_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    from stt_fast.progress import progress_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not progress_bar(range(3), desc="x").disable
    assert progress_bar(range(3), desc="x", enabled=False).disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress_bar(range(3), desc="x").disable, "piped or logged output gets no bar"


def test_compile_logs_its_stages_and_where_the_cache_lives(tmp_path, caplog):
    import stt_fast

    model = trained_looking(get_config("tiny"))
    with caplog.at_level("INFO", logger="stt_fast"):
        stt_fast.compile(model, backend="onnxruntime", cache_dir=tmp_path)
        stt_fast.compile(model, backend="onnxruntime", cache_dir=tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert any("exporting the program to ONNX" in m and str(tmp_path) in m for m in messages)
    assert any("reusing the exported program cached in" in m for m in messages)
    assert any("validating the 'onnxruntime' backend" in m for m in messages)


def test_the_project_stands_alone():
    """Nothing in the project points at the developers' workshop outside the repository."""
    workshop = "../" + "shared"  # spelled in two parts so that this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".toml", ".sh", ".cfg", ".txt") or path.name in ("Makefile", "run"):
            assert workshop not in path.read_text(errors="replace"), f"{name} points at {workshop}"


def test_eval_skips_and_reports_unreadable_clips(synth_root, checkpoint, tmp_path):
    """One truncated mp4 and one empty frame folder in the test split: eval goes on without them, names
    them on stderr (one line each, no traceback) and in the JSON, exit 0. (Mutation: the evaluation set
    without skip_bad stops with a DataLoader worker's traceback.)"""
    from stt_fast.data.datasets import dfew_items

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    items = dfew_items(data, 1, "test")
    video = next(i.path for i in items if Path(i.path).suffix == ".mp4")
    folder = next(i.path for i in items if Path(i.path).is_dir())
    Path(video).write_bytes(Path(video).read_bytes()[:200])  # truncated
    for frame in Path(folder).iterdir():
        frame.unlink()
    result = stt_fast("eval", str(data), "--checkpoint", str(checkpoint), "--device", "cpu", "--workers", "1",
                      "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and any(str(video) in line for line in skipped)
    report = json.loads(result.stdout)
    assert {item["path"] for item in report["bad_clips"]} == {str(video), str(folder)}
    assert report["samples"] == len(items) - 2


def test_run_files_and_checkpoints_share_the_usual_permissions(tmp_path):
    """(Mutation: checkpoints came out 0600, as mkstemp makes them, beside 0644 run files.)"""
    from stt_fast.files import current_umask, write_text_atomic

    expected = 0o666 & ~current_umask()
    checkpoint = save_checkpoint(trained_looking(get_config("tiny")), tmp_path / "m.safetensors")
    text = write_text_atomic(tmp_path / "run.json", "{}")
    assert (checkpoint.stat().st_mode & 0o777) == expected == (text.stat().st_mode & 0o777)


def test_predict_on_a_folder_of_videos_points_at_annotate(synth_root, checkpoint, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    video = next(p for p in (synth_root / "Clip" / "original").iterdir() if p.suffix == ".mp4")
    shutil.copyfile(video, folder / "a.mp4")
    result = stt_fast("predict", str(folder), "--checkpoint", str(checkpoint), "--device", "cpu", "--quiet")
    assert result.returncode == 2 and "stt-fast annotate" in result.stderr and "Traceback" not in result.stderr


def test_third_party_loggers_stay_quiet_at_info(caplog):
    """stt_fast's own stage messages at INFO, without the exporter libraries' hundreds of lines."""
    import logging

    from stt_fast.cli import NOISY_LOGGERS, _setup_logging

    _setup_logging(quiet=False)
    assert logging.getLogger("stt_fast").level == logging.INFO
    for name in NOISY_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name


def test_mistakes_a_new_user_makes_say_what_to_do(synth_root, checkpoint, tmp_path, monkeypatch, capsys):
    """A checkpoint folder names a file in it; an empty results folder points at `make bench` and the committed
    results; a set without DFEW files mentions --layout folders; train into a run refuses before reading data."""
    from stt_fast.data import datasets

    assert main(["predict", str(synth_root / "Clip" / "original" / "00003.mp4"), "--checkpoint",
                 str(checkpoint.parent), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a checkpoint file: pass a file in it" in err and "m.safetensors" in err
    (tmp_path / "empty").mkdir()
    assert main(["bench", "report", str(tmp_path / "empty")]) == 2
    assert "make bench" in capsys.readouterr().err
    folders = tmp_path / "afew"
    (folders / "Train" / "Happy").mkdir(parents=True)
    assert main(["eval", str(folders), "--checkpoint", str(checkpoint), "--quiet"]) == 2
    assert "--layout folders" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("{}\n")
    monkeypatch.setattr(datasets, "dfew_items", lambda *a, **k: pytest.fail("the data was read before refusing"))
    assert main(_train_args(synth_root, run, "--epochs", "1")) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
