"""The default `attn-fast train` run for one decoder, then the best checkpoint's greedy exact match and character
accuracy on the date task's test split (dates never seen in training, in any format).

    python -m benchmarks.seq2seq_default_runs parallel|bahdanau [--out-dir runs/defaults] [--overwrite]
"""
import argparse
import time

from attn_fast.examples.seq2seq import load_checkpoint, make_date_splits
from attn_fast.examples.seq2seq.train import evaluate
from attn_fast.tools.cli import main as cli_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoder", choices=["parallel", "bahdanau"])
    parser.add_argument("--out-dir", default="runs/defaults")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run's checkpoints there (attn-fast train refuses them otherwise)")
    args = parser.parse_args()
    out_dir = f"{args.out_dir}/{args.decoder}"
    start = time.time()
    train_args = ["train", "--decoder", args.decoder, "--out-dir", out_dir, "--quiet"]
    if cli_main(train_args + (["--overwrite"] if args.overwrite else [])) != 0:
        raise SystemExit("training failed")
    wall = time.time() - start
    model, src_vocab, tgt_vocab, _ = load_checkpoint(f"{out_dir}/best.pt")
    test = make_date_splits(seed=0, sizes=(20000, 1000, 1000)).test  # the default data seed
    print(f"{args.decoder}: wall {wall:.0f} s, test {evaluate(model, test, src_vocab, tgt_vocab)}")


if __name__ == "__main__":
    main()
