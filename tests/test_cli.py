"""The stt-fast command line: info."""

import json

from stt_fast.cli import main


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
