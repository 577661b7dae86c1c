"""`attn-fast translate` and `attn-fast evaluate` on a checkpoint of a tiny `attn-fast train` run; how the train
options map to the Seq2Seq config."""
import dataclasses
import importlib

import pytest

from attn_fast.examples.seq2seq.train import TrainConfig
from attn_fast.tools.cli import main


@pytest.fixture(scope="module")
def checkpoint(tiny_seq2seq_checkpoint):
    """A tiny 8-step `attn-fast train` run's last.pt (conftest: trained once for the session, only read here)."""
    return tiny_seq2seq_checkpoint


@pytest.mark.parametrize("beam", ["1", "3"])
def test_translate_prints_outputs_and_saves_heatmaps(checkpoint, tmp_path, capsys, beam):
    heatmap = tmp_path / "alignment.png"
    sources = ["25 июня 2009 г.", "June 25, 2009"]
    assert main(["translate", "--checkpoint", str(checkpoint), "--beam", beam, "--heatmap", str(heatmap),
                 *sources]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == sources
    for number in range(2):
        image = tmp_path / f"alignment-{number}.png"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 1000


def test_evaluate_prints_scores(checkpoint, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--test-size", "20"]) == 0
    assert capsys.readouterr().out.startswith("20 pairs: exact match ")
    (tmp_path / "test.tsv").write_text("12.03.2001\t2001-03-12\n2001-03-12\t2001-03-12\n", encoding="utf-8")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-tsv", str(tmp_path / "test.tsv")]) == 0
    output = capsys.readouterr().out
    assert output.startswith("2 pairs: exact match ") and ", BLEU " in output


def test_train_options_are_the_config_fields(monkeypatch):
    seen = []
    monkeypatch.setattr(importlib.import_module("attn_fast.examples.seq2seq.train"), "train", seen.append)
    assert main(["train"]) == 0
    assert seen.pop() == TrainConfig()
    assert main(["train", "--decoder", "bahdanau", "--max-steps", "30", "--data-tsv", "a.tsv", "--valid-tsv", "b.tsv",
                 "--dropout", "0.1", "--out-dir", "x", "--quiet"]) == 0
    assert seen.pop() == dataclasses.replace(TrainConfig(), decoder="bahdanau", max_steps=30, data_tsv="a.tsv",
                                             valid_tsv="b.tsv", dropout=0.1, out_dir="x", quiet=True)
