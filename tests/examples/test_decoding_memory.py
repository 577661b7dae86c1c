"""Decoding memory grows linearly in the source length (issue 14): greedy and beam search without an attention
history, measured as the peak-RSS growth of a fresh process; and decoding with or without that history gives the
same tokens and scores, bit for bit.

Run as a script, this file is the probe: it decodes one random source of LENGTH characters with a tiny randomly
initialized Seq2Seq (no training needed: only shapes matter) and prints the peak-RSS growth as JSON.

    python tests/examples/test_decoding_memory.py greedy|beam LENGTH [--attention]
"""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from attn_fast.examples.seq2seq.model import Seq2Seq

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
VOCAB = 40  # source and target ids; 0..3 are PAD, BOS, EOS, UNK as in CharVocab
# Peak-RSS growth allowed for decoding a 4000-character source. What it needs: the encoder states and the memory,
# a few [S, 16] float tensors (~1 MiB), and per step the weights [beam, S]; measured 1-3 MiB. The attention
# history it no longer keeps would be 2 x [8010, 4000] floats for greedy (list + stack: 245 MiB), the same per
# beam row for beam search; 64 MiB leaves room for allocator slack and fails at a quarter of that history.
BOUND_MIB = 64
# Added to 4x the growth at 1000 characters when checking linearity: the growths are a few MiB, where allocator
# rounding is of the same order, while a quadratic history adds 245 - 4 x 15 = 185 MiB between the two lengths.
SLACK_MIB = 16


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    status = pathlib.Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def _tiny_model(decoder: str) -> Seq2Seq:
    torch.manual_seed(0)
    model = Seq2Seq(VOCAB, VOCAB, embed_dim=8, hidden_dim=8, attn_dim=8, decoder=decoder,
                    attention_backend="torch").eval()
    with torch.no_grad():  # EOS never wins: every one of the 2 S + 10 steps runs, the worst case for memory
        model.decoder.output.bias[model.eos_id] = -1e4
    return model


def _decode(model: Seq2Seq, search: str, length: int, need_attention: bool):
    src = torch.randint(4, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    lengths = torch.tensor([length])
    if search == "greedy":
        return model.greedy(src, lengths, need_attention=need_attention)
    return model.beam_search(src, lengths, beam_size=2, need_attention=need_attention)


def probe_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("search", choices=["greedy", "beam"])
    parser.add_argument("length", type=int)
    parser.add_argument("--attention", action="store_true", help="keep the attention history (the old way)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = _tiny_model("parallel")
    _decode(model, args.search, 10, args.attention)  # warm-up: every library loaded, the allocator primed
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak is this decode's
    before = _status_mib("VmRSS")
    decoded = _decode(model, args.search, args.length, args.attention)
    growth = _status_mib("VmHWM") - before
    print(json.dumps({"peak_rss_growth_mib": growth, "steps": int(decoded.lengths.max())}))


def peak_growths(search: str, lengths: list[int], *, attention: bool = False) -> list[dict]:
    """The probe's measurements, one fresh process per length, run side by side (each has one thread and its own
    peak RSS, so they do not disturb each other's figure; the wall time is the longest one's)."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPOSITORY))
    flags = ["--attention"] if attention else []
    processes = [subprocess.Popen([sys.executable, __file__, search, str(length), *flags], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=environment, cwd=REPOSITORY)
                 for length in lengths]
    results = []
    try:
        for length, process in zip(lengths, processes):
            stdout, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr
            measured = json.loads(stdout.strip().splitlines()[-1])
            assert measured["steps"] == 2 * length + 10, measured  # the decode ran to max_len: the worst case
            results.append(measured)
    finally:
        for process in processes:  # (only those a failure left running)
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_decoding_memory_grows_linearly_in_the_source_length(search):
    short, long = peak_growths(search, [1000, 4000])
    assert long["peak_rss_growth_mib"] < BOUND_MIB, (short, long)
    assert long["peak_rss_growth_mib"] <= 4 * short["peak_rss_growth_mib"] + SLACK_MIB, (short, long)


@pytest.mark.slow
def test_the_probe_sees_an_attention_history():
    """The measurement can fail: keeping the history of a 1000-character greedy decode (a [1, 1000] row per step
    and their stack, 2 x [2010, 1000] floats: 15.3 MiB; measured 17 MiB) shows in the growth."""
    [measured] = peak_growths("greedy", [1000], attention=True)
    assert measured["peak_rss_growth_mib"] >= 12, measured


@pytest.mark.parametrize("decoder", ["parallel", "bahdanau"])
@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_decoding_without_attention_history_is_bit_identical(decoder, search):
    model = _tiny_model(decoder)
    with torch.no_grad():
        model.decoder.output.bias[model.eos_id] = 0.0  # rows finish at different steps here
    torch.manual_seed(1)
    src = torch.randint(4, VOCAB, (5, 17))
    lengths = torch.tensor([17, 9, 1, 12, 17])
    src[torch.arange(17)[None, :] >= lengths[:, None]] = 0
    search_call = (lambda **kw: model.greedy(src, lengths, **kw)) if search == "greedy" else (
        lambda **kw: model.beam_search(src, lengths, beam_size=3, **kw))
    with_history, without = search_call(need_attention=True), search_call(need_attention=False)
    assert without.attention is None and with_history.attention.shape[:2] == with_history.tokens.shape
    for name in ("tokens", "lengths", "scores", "log_probs"):
        assert torch.equal(getattr(with_history, name), getattr(without, name)), name


if __name__ == "__main__":
    probe_main()
