"""Multi-process training: a 2-process CPU run under torchrun (gloo) trains a few steps with DistributedDataParallel
and leaves both ranks holding identical weights; the sharding of the epoch's batches."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attn_fast.examples.distributed import Distributed, shard

RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from attn_fast.examples.seq2seq.train import TrainConfig, train

    out = sys.argv[1]
    config = TrainConfig(train_size=600, valid_size=40, batch_size=16, max_steps=8, embed_dim=16, hidden_dim=32,
                         attn_dim=16, dropout=0.1, lr=1e-2, attention_backend="torch", device="cpu", quiet=True,
                         out_dir=os.path.join(out, "run"))
    result = train(config)
    torch.save({"state": result.model.state_dict(), "steps": result.steps, "valid": result.valid},
               os.path.join(out, f"rank{os.environ['RANK']}.pt"))
""")


def test_shard_gives_each_rank_an_equal_disjoint_share():
    items = list(range(11))
    shards = [shard(items, Distributed(rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # the tail (9, 10) is dropped: equal step counts
    assert shard(items, Distributed()) == items


@pytest.mark.slow
def test_two_process_gloo_run_keeps_identical_weights(tmp_path):
    script = tmp_path / "rank_main.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 8
    assert ranks[0]["valid"] == ranks[1]["valid"]  # rank 0 validated and sent its metrics
    for name, weight in ranks[0]["state"].items():
        assert torch.equal(weight, ranks[1]["state"][name]), name

    # Only rank 0 wrote the checkpoint; it holds the same weights, both ranks' RNG states and the process count.
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]["ranks"]) == 2
    assert not torch.equal(checkpoint["rng"]["ranks"][0], checkpoint["rng"]["ranks"][1])  # distinct dropout
    assert checkpoint["step"] == 8
    for name, weight in checkpoint["model"].items():
        assert torch.equal(weight, ranks[0]["state"][name]), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_mid_epoch_resume_needs_the_same_process_count(tmp_path):
    from attn_fast.examples.checkpoints import save_checkpoint
    from attn_fast.examples.seq2seq.train import TrainConfig, train

    common = dict(train_size=600, valid_size=20, batch_size=16, embed_dim=8, hidden_dim=16, attn_dim=8,
                  attention_backend="torch", device="cpu", quiet=True)
    first = train(TrainConfig(max_steps=3, out_dir=str(tmp_path / "run"), **common))
    checkpoint = torch.load(first.last_checkpoint, weights_only=True)
    assert checkpoint["world_size"] == 1 and checkpoint["batch_in_epoch"] == 3  # stopped inside epoch 0
    checkpoint["world_size"] = 2  # as if written by a 2-process run: its batch_in_epoch counts that run's shards
    save_checkpoint(checkpoint, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="same number of processes"):
        train(TrainConfig(max_steps=6, out_dir=str(tmp_path / "resumed"), resume=str(tmp_path / "two.pt"), **common))
