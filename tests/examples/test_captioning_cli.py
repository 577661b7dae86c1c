"""`attn-fast train-captions`, `attn-fast caption` and `attn-fast evaluate-captions` on a tiny run; how the
train-captions options map to the captioning config, and each task's commands refusing the other's options."""
import dataclasses
import importlib
import pathlib
import subprocess

import pytest

from attn_fast.examples.captioning.train import CaptionTrainConfig, load_checkpoint
from attn_fast.tools.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("captions")
    argv = ["train-captions", "--train-size", "64", "--valid-size", "8", "--image-size", "48",
            "--channels", "8", "--embed-dim", "8", "--hidden-dim", "16", "--attn-dim", "8", "--batch-size", "16",
            "--max-steps", "3", "--attention-backend", "torch", "--device", "cpu", "--out-dir", str(out_dir),
            "--quiet"]
    assert main(argv) == 0
    return out_dir / "last.pt"


def test_train_writes_a_captioning_checkpoint(checkpoint):
    model, vocab, info = load_checkpoint(checkpoint)
    assert info["step"] == 3 and info["train_config"]["image_size"] == 48 and model.grid == 6
    assert info["train_config"]["channels"] == 8 and model.encoder.channels == 8


@pytest.mark.slow
def test_caption_writes_samples_prints_captions_and_saves_overlays(checkpoint, tmp_path, capsys):
    samples = tmp_path / "samples"
    assert main(["caption", "--write-samples", str(samples), "--count", "2", "--checkpoint", str(checkpoint)]) == 0
    listed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    images = [str(samples / "test-000.png"), str(samples / "test-001.png")]
    assert [path for path, _ in listed] == images
    assert (samples / "captions.tsv").read_text(encoding="utf-8").splitlines() == ["\t".join(r) for r in listed]
    for beam in ("1", "3"):
        overlay = tmp_path / f"overlay-beam{beam}.png"
        assert main(["caption", *images, "--checkpoint", str(checkpoint), "--beam", beam,
                     "--overlay", str(overlay)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split("\t")[0] for line in lines] == images
        for number in range(2):
            figure = tmp_path / f"overlay-beam{beam}-{number}.png"
            assert figure.read_bytes()[:8] == PNG_MAGIC and figure.stat().st_size > 1000


def test_caption_rejects_images_of_another_size(checkpoint, tmp_path, capsys):
    assert main(["caption", "--write-samples", str(tmp_path), "--count", "1", "--image-size", "64"]) == 0
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "test-000.png"), "--checkpoint", str(checkpoint)]) == 2
    assert "the model takes 48x48" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "test-000.png")]) == 2  # no checkpoint


@pytest.mark.slow
def test_caption_reports_bad_images_and_captions_the_rest(checkpoint, tmp_path, capsys, cli_processes):
    """Through the real entry point (`python -m attn_fast.tools.cli`, in a process of its own forked from the
    fixture's server: tests/cli_process.py): an unreadable and a missing image get one error line each, the good
    one is captioned and its overlay written into a directory that did not exist; nothing else is touched."""
    samples = tmp_path / "samples"
    assert main(["caption", "--write-samples", str(samples), "--count", "1", "--checkpoint", str(checkpoint)]) == 0
    capsys.readouterr()
    good, not_png, missing = samples / "test-000.png", tmp_path / "notes.png", tmp_path / "missing.png"
    not_png.write_text("not an image", encoding="utf-8")
    overlay = tmp_path / "figures" / "new" / "overlay.png"
    forked = cli_processes.run("caption", str(good), str(not_png), str(missing), "--checkpoint", str(checkpoint),
                               "--overlay", str(overlay), cwd=REPOSITORY)
    completed = subprocess.CompletedProcess(forked.args, forked.returncode, forked.stdout.decode("utf-8"),
                                            forked.stderr.decode("utf-8"))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("attn-fast caption: error: ")]
    assert len(errors) == 2, completed.stderr
    assert f"image 2: {not_png}: cannot read it as a PNG image" in errors[0]
    assert f"image 3: {missing}: no such image file" in errors[1]
    [line] = completed.stdout.splitlines()
    assert line.startswith(f"{good}\t") and line.count("\t") == 1
    figure = overlay.parent / "overlay-0.png"
    assert figure.read_bytes()[:8] == PNG_MAGIC and sorted(overlay.parent.iterdir()) == [figure]
    assert sorted(p.name for p in samples.iterdir()) == ["captions.tsv", "test-000.png"]
    assert not_png.read_text(encoding="utf-8") == "not an image" and not missing.exists()


def test_evaluate_prints_caption_scores(checkpoint, capsys):
    assert main(["evaluate-captions", "--checkpoint", str(checkpoint), "--test-size", "6"]) == 0
    output = capsys.readouterr().out
    assert output.startswith("6 scenes: exact match ") and ", BLEU " in output and "(chance " in output


def captured_config(monkeypatch, argv):
    seen = []
    # (the module: `attn_fast.examples.captioning.train` the attribute is the function the package re-exports)
    monkeypatch.setattr(importlib.import_module("attn_fast.examples.captioning.train"), "train", seen.append)
    assert main(argv) == 0
    return seen[0]


def test_options_not_given_take_the_captioning_defaults(monkeypatch):
    assert captured_config(monkeypatch, ["train-captions"]) == CaptionTrainConfig()
    config = captured_config(monkeypatch, ["train-captions", "--lr", "0.01", "--out-dir", "x", "--channels", "16",
                                           "--time-limit", "60", "--initial-state", "mean", "--quiet"])
    assert config == dataclasses.replace(CaptionTrainConfig(), lr=0.01, out_dir="x", channels=16, time_limit=60.0,
                                         initial_state="mean", quiet=True)


@pytest.mark.parametrize("argv", [
    ["train-captions", "--decoder", "bahdanau"],
    ["train-captions", "--data-tsv", "t.tsv"],
    ["train", "--channels", "16"],
    ["train", "--task", "captions"],
    ["evaluate-captions", "--checkpoint", "x.pt", "--data-tsv", "t.tsv"],
    ["evaluate", "--checkpoint", "x.pt", "--beam", "2"],
])
def test_options_of_the_other_task_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
