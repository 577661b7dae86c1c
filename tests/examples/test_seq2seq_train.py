"""The Seq2Seq trainer: a short run on the date task beats a frequency baseline computed from the data, checkpoints
round-trip to identical greedy outputs, stop + resume equals an uninterrupted run bit for bit (and records the model
it really resumed), checkpoint writes are atomic, checkpoint reads refuse damaged and foreign files by name, config
values are checked before any work, and `attn-fast train` runs from the command line."""
import os
from collections import Counter

import pytest
import torch

from attn_fast.examples import checkpoints
from attn_fast.examples.checkpoints import CHECKPOINT_TASKS, save_checkpoint
from attn_fast.examples.errors import UserError
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



@pytest.mark.parametrize(("field", "value", "message"), [
    ("batch_size", 0, "--batch-size must be a positive integer, got 0"),
    ("batch_size", 2.5, "--batch-size must be a positive integer, got 2.5"),
    ("lr", float("nan"), "--lr must be a positive number, got nan"),
    ("lr", 0.0, "--lr must be a positive number"),
    ("hidden_dim", 0, "--hidden-dim must be a positive integer"),
    ("dropout", 1.5, r"--dropout must be in \[0, 1\), got 1.5"),
    ("max_steps", -1, "--max-steps must be a positive integer, got -1"),
    ("epochs", 0, "--epochs must be a positive integer, got 0"),
    ("time_limit", float("inf"), "--time-limit must be a positive number of seconds"),
    ("grad_clip", -1.0, "--grad-clip must be a number >= 0"),
    ("decoder", "luong", "--decoder must be one of bahdanau, parallel"),
    ("attention_backend", "cuda", "--attention-backend must be one of"),
    ("device", "gpu", "--device 'gpu' is not a torch device"),
])
def test_config_values_are_checked_on_construction(field, value, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**{field: value})
    config = TrainConfig()
    setattr(config, field, value)  # changed after construction: train checks again before any work
    with pytest.raises(UserError, match=message):
        train(config)


def test_config_combinations_and_files_are_checked_before_any_work(tmp_path):
    with pytest.raises(UserError, match="give both --data-tsv and --valid-tsv"):
        TrainConfig(data_tsv="train.tsv")
    with pytest.raises(UserError, match="--overwrite starts a new run and --resume continues one"):
        TrainConfig(resume="last.pt", overwrite=True)
    config = TrainConfig(data_tsv=str(tmp_path / "train.tsv"), valid_tsv=str(tmp_path / "valid.tsv"),
                         out_dir=str(tmp_path / "run"))  # a path is only looked at when the run starts
    with pytest.raises(UserError, match="--data-tsv .*train.tsv: no such file"):
        train(config)
    with pytest.raises(UserError, match="--resume .*last.pt: no such checkpoint file"):
        train(TrainConfig(resume=str(tmp_path / "last.pt"), out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_load_checkpoint_names_the_file_and_the_problem(tmp_path):
    written = {"format": CHECKPOINT_TASKS["train"].format, "model_config": {}, "model": {}, "step": 1, "epoch": 0,
               "batch_in_epoch": 1, "best_valid_exact_match": None, "valid": {}, "train_config": {},
               "src_vocab": {}, "tgt_vocab": {}}
    torch.save(written, tmp_path / "whole.pt")
    assert checkpoints.load_checkpoint(tmp_path / "whole.pt", "train")["step"] == 1
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) - 100])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({key: value for key, value in written.items() if key != "model_config"}, tmp_path / "keyless.pt")
    torch.save(dict(written, format=CHECKPOINT_TASKS["train-captions"].format), tmp_path / "captions.pt")
    torch.save(dict(written, format="attn-fast-seq2seq-checkpoint/9"), tmp_path / "future.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    expected = {
        "truncated.pt": "truncated.pt is not a readable checkpoint: truncated or damaged",
        "empty.pt": r"empty.pt is empty \(0 bytes\)",
        "keyless.pt": "keyless.pt is a checkpoint of attn-fast train without model_config",
        "captions.pt": "captions.pt is a checkpoint of attn-fast train-captions, not train$",
        "future.pt": "future.pt has checkpoint format 'attn-fast-seq2seq-checkpoint/9'",
        "list.pt": r"list.pt is not an attn-fast checkpoint \(no format entry\)",
        "missing.pt": "missing.pt: no such checkpoint file",
        ".": "is a directory, not a checkpoint file",
    }
    for name, message in expected.items():
        with pytest.raises(UserError, match=message):
            checkpoints.load_checkpoint(tmp_path / name, "train")
    with pytest.raises(UserError, match="without optimizer, rng"):  # enough to evaluate, not to resume
        checkpoints.load_checkpoint(tmp_path / "whole.pt", "train", for_resume=True)


def test_resume_records_the_model_it_really_trains_and_refuses_to_do_nothing(tmp_path, capsys):
    common = dict(train_size=64, valid_size=8, batch_size=16, **dict(TINY, quiet=False))
    first = train(TrainConfig(max_steps=1, out_dir=str(tmp_path), **common))
    capsys.readouterr()
    # The architecture is the checkpoint's: --hidden-dim 64 and --decoder bahdanau cannot apply to it.
    resumed = train(TrainConfig(max_steps=2, out_dir=str(tmp_path), resume=first.last_checkpoint,
                                **dict(common, hidden_dim=64, decoder="bahdanau")))
    assert "resume: the model is the checkpoint's, --decoder parallel (not bahdanau), --hidden-dim 32 (not 64)" in (
        capsys.readouterr().err)
    saved = torch.load(resumed.last_checkpoint, weights_only=True)
    assert saved["step"] == 2
    for name in ("hidden_dim", "decoder", "embed_dim"):
        assert saved["train_config"][name] == saved["model_config"][name] == TINY.get(name, "parallel")

    # A resume whose stopping rule is already met would train nothing and exit 0: refused.
    with pytest.raises(UserError, match="--max-steps 2: --resume .*last.pt is already at step 2"):
        train(TrainConfig(max_steps=2, out_dir=str(tmp_path), resume=resumed.last_checkpoint, **common))
    save_checkpoint(dict(saved, epoch=1), tmp_path / "epoch-1.pt")
    with pytest.raises(UserError, match=r"--epochs 1: --resume .*epoch-1.pt has already done 1 epoch\(s\)"):
        train(TrainConfig(epochs=1, out_dir=str(tmp_path), resume=str(tmp_path / "epoch-1.pt"), **common))
    # Weights that do not fit the stored model_config: named as a damaged file, not a state_dict traceback.
    save_checkpoint(dict(saved, model_config=dict(saved["model_config"], hidden_dim=48)), tmp_path / "misfit.pt")
    with pytest.raises(UserError, match="misfit.pt: its model_config and weights do not make a model"):
        load_checkpoint(tmp_path / "misfit.pt")
