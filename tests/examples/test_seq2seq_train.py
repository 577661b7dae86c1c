"""The Seq2Seq trainer: a short run on the date task beats a frequency baseline computed from the data, checkpoints
round-trip to identical greedy outputs, stop + resume equals an uninterrupted run bit for bit, checkpoint writes are
atomic, and `attn-fast train` runs from the command line."""
import os
from collections import Counter

import pytest
import torch

from attn_fast.examples.checkpoints import save_checkpoint
from attn_fast.examples.metrics import character_accuracy
from attn_fast.examples.seq2seq import build_vocabs, make_date_splits, read_tsv
from attn_fast.examples.seq2seq.train import TrainConfig, load_checkpoint, train, translate
from attn_fast.tools.cli import main

TINY = dict(embed_dim=16, hidden_dim=32, attn_dim=16, attention_backend="torch", device="cpu", quiet=True)


def frequency_baseline(train_targets, valid_targets):
    """Character accuracy on `valid_targets` of the best input-blind guess: the most frequent training character
    at each position (for ISO dates: "19"/"20", the dashes, the commonest month and day digits)."""
    width = max(map(len, train_targets))
    guess = "".join(Counter(t[i] for t in train_targets if len(t) > i).most_common(1)[0][0] for i in range(width))
    return character_accuracy([guess] * len(valid_targets), valid_targets)


def test_character_accuracy_counts_reference_positions():
    assert character_accuracy(["2009-06-25"], ["2009-06-25"]) == 1.0
    assert character_accuracy(["2009-06-2"], ["2009-06-25"]) == 0.9           # a missing character is wrong
    assert character_accuracy(["2009-06-25xyz"], ["2009-06-25"]) == 1.0      # extra characters are not counted
    assert character_accuracy(["ab", ""], ["ab", "cd"]) == 0.5
    with pytest.raises(ValueError):
        character_accuracy(["a"], [])


@pytest.fixture(scope="module")
def date_run(tmp_path_factory):
    """A ~15 s run of a tiny model on a small date task."""
    out_dir = tmp_path_factory.mktemp("dates")
    config = TrainConfig(train_size=3000, valid_size=200, batch_size=32, lr=1e-2, max_steps=400,
                         out_dir=str(out_dir), **TINY)
    return config, train(config)


@pytest.mark.slow
def test_short_run_beats_the_frequency_baseline(date_run):
    config, result = date_run
    splits = make_date_splits(config.data_seed, (config.train_size, config.valid_size, 0))
    baseline = frequency_baseline([t for _, t in splits.train], [t for _, t in splits.valid])
    assert 0.3 < baseline < 0.7  # sanity of the baseline itself: ISO dates have predictable characters
    assert result.steps == 400 and result.stop_reason == "max_steps"
    assert result.valid["char_accuracy"] > baseline + 0.4, (result.valid, baseline)
    assert result.best_valid_exact_match >= max(h["valid_exact_match"] for h in result.history)
    assert result.best_valid_exact_match > 0.5  # the baseline guess is one fixed date: exact match ~0


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_greedy_outputs(date_run):
    config, result = date_run
    model, src_vocab, tgt_vocab, info = load_checkpoint(result.last_checkpoint, "cpu")
    splits = make_date_splits(config.data_seed, (config.train_size, config.valid_size, 0))
    assert (src_vocab, tgt_vocab) == build_vocabs(splits.train)
    assert info["step"] == result.steps and info["valid"] == result.valid
    assert not model.training
    src_batch = [s for s, _ in splits.valid[:64]]
    assert translate(model, src_batch, src_vocab, tgt_vocab) == translate(result.model, src_batch, src_vocab,
                                                                          tgt_vocab)
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    *_, best_info = load_checkpoint(result.best_checkpoint, "cpu")
    assert best_info["best_valid_exact_match"] == result.best_valid_exact_match


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path):
    # 160 pairs / 16 = 10 batches an epoch: the stop at step 7 is inside epoch 1, the end (step 14) inside epoch 2.
    # Dropout on, so that the RNG state must be restored too.
    common = dict(train_size=160, valid_size=16, batch_size=16, dropout=0.3, **TINY)
    straight = train(TrainConfig(max_steps=14, out_dir=str(tmp_path / "straight"), **common))
    first = train(TrainConfig(max_steps=7, out_dir=str(tmp_path / "split"), **common))
    halfway = torch.load(first.last_checkpoint, weights_only=True)
    assert (halfway["step"], halfway["epoch"], halfway["batch_in_epoch"]) == (7, 0, 7)
    resumed = train(TrainConfig(max_steps=14, out_dir=str(tmp_path / "split"), resume=first.last_checkpoint,
                                **common))
    assert resumed.steps == straight.steps == 14 and resumed.epoch == straight.epoch == 1

    a = torch.load(straight.last_checkpoint, weights_only=True)
    b = torch.load(resumed.last_checkpoint, weights_only=True)
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"]) == (14, 1, 4)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
        assert not torch.equal(tensor, halfway["model"][name]), name  # and it did train after the resume
    for (pa, sa), (pb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert pa == pb and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"step": 1, "weight": torch.arange(4.0)}, path)

    def torch_save_that_dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_that_dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "weight": torch.zeros(4)}, path)
    monkeypatch.undo()

    previous = torch.load(path, weights_only=True)
    assert previous["step"] == 1 and torch.equal(previous["weight"], torch.arange(4.0))
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind
    save_checkpoint({"step": 3, "weight": torch.ones(4)}, path)
    assert torch.load(path, weights_only=True)["step"] == 3 and os.listdir(path.parent) == ["last.pt"]


def test_cli_trains_on_tsv_files(tmp_path, capsys):
    words = ["abc", "hello", "attention", "bahdanau", "kernel", "tanh", "softmax", "decoder", "encoder", "gru"]
    for name, rows in (("train.tsv", words * 4), ("valid.tsv", words[:4])):
        (tmp_path / name).write_text("".join(f"{w}\t{w[::-1]}\n" for w in rows), encoding="utf-8")
    out_dir = tmp_path / "run"
    argv = ["train", "--data-tsv", str(tmp_path / "train.tsv"), "--valid-tsv", str(tmp_path / "valid.tsv"),
            "--embed-dim", "8", "--hidden-dim", "16", "--attn-dim", "8", "--batch-size", "8", "--max-steps", "6",
            "--attention-backend", "torch", "--device", "cpu", "--out-dir", str(out_dir), "--quiet"]
    assert main(argv) == 0
    assert "train: 6 steps" in capsys.readouterr().out
    _, src_vocab, tgt_vocab, info = load_checkpoint(out_dir / "last.pt")
    assert info["step"] == 6 and info["epoch"] == 1  # 40 pairs / 8 = 5 steps an epoch
    assert (src_vocab, tgt_vocab) == build_vocabs(read_tsv(tmp_path / "train.tsv"))


def test_cli_needs_both_tsv_files(tmp_path, capsys):
    assert main(["train", "--data-tsv", str(tmp_path / "train.tsv"), "--quiet"]) == 2
    assert "--valid-tsv" in capsys.readouterr().err

