"""Mixup, the class-balanced sampler, the original LR schedule and checkpoint averaging."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from htsat_hf.training.averaging import average_state_dicts
from htsat_hf.training.mixup import HTSATDataCollator, mix_targets, sample_mixup_lambda
from htsat_hf.training.sampling import ClassBalancedSampler
from htsat_hf.training.schedule import HTSATLRLambda, get_htsat_schedule, original_lr_multiplier


# ------------------------------------------------------------------------------------------------------ mixup
def test_mixup_lambda_follows_beta_half_half():
    lam = sample_mixup_lambda(20000, 0.5, np.random.default_rng(0)).numpy()
    assert lam.dtype == np.float32 and lam.shape == (20000,)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert stats.kstest(lam, stats.beta(0.5, 0.5).cdf).pvalue > 0.01
    assert abs(lam.mean() - 0.5) < 0.02
    assert ((lam < 0.1) | (lam > 0.9)).mean() > 0.35  # U-shaped: Beta(.5,.5) puts 41% there


def test_mix_targets_matches_the_input_mixing_rule():
    labels = torch.tensor([0, 2, 1])
    lam = torch.tensor([0.7, 0.5, 0.2])
    mixed = mix_targets(labels, lam, num_labels=3)
    one_hot = torch.eye(3)[labels]
    expected = one_hot * lam[:, None] + one_hot.flip(0) * (1 - lam[:, None])
    torch.testing.assert_close(mixed, expected)
    torch.testing.assert_close(mixed.sum(1), torch.ones(3))
    multi_hot = torch.tensor([[1.0, 1, 0], [0, 0, 1]])
    torch.testing.assert_close(mix_targets(multi_hot, torch.tensor([0.25, 0.75])), torch.tensor([[0.25, 0.25, 0.75], [0.25, 0.25, 0.75]]))


def _batch(n=4, classes=3):
    return [{"input_features": np.full((5, 2), i, np.float32), "labels": i % classes} for i in range(n)]


def test_collator_adds_lambda_and_mixes_targets_only_when_asked():
    collate = HTSATDataCollator(num_labels=3, mixup_alpha=0.5, seed=0)
    batch = collate(_batch())
    assert batch["input_features"].shape == (4, 5, 2)
    assert batch["mixup_lambda"].shape == (4,)
    lam = batch["mixup_lambda"]
    torch.testing.assert_close(batch["labels"], mix_targets(torch.tensor([0, 1, 2, 0]), lam, 3))

    original = HTSATDataCollator(num_labels=3, mixup_alpha=0.5, mix_targets=False, seed=0)(_batch())
    assert original["labels"].dtype == torch.long and original["labels"].tolist() == [0, 1, 2, 0]
    assert "mixup_lambda" in original

    evaluation = collate.for_eval()(_batch())
    assert "mixup_lambda" not in evaluation and evaluation["labels"].dtype == torch.long
    assert "mixup_lambda" not in HTSATDataCollator(num_labels=3)(_batch())


def test_collator_rejects_unequal_lengths():
    items = _batch(2)
    items[1]["input_features"] = np.zeros((7, 2), np.float32)
    with pytest.raises(ValueError, match="different feature shapes"):
        HTSATDataCollator(num_labels=3)(items)


# ---------------------------------------------------------------------------------------------------- sampler
def test_balanced_sampler_equalises_a_skewed_set():
    labels = [[0]] * 900 + [[1]] * 90 + [[2]] * 10  # 90% / 9% / 1%
    sampler = ClassBalancedSampler(labels, num_classes=3, seed=0, num_replicas=1, rank=0)
    queue = list(sampler)
    assert len(queue) == len(sampler) == 1000
    counts = Counter(labels[i][0] for i in queue)
    assert all(abs(counts[c] - 1000 / 3) <= 1 for c in range(3)), counts  # one per class per round
    assert len({i for i in queue if labels[i][0] == 2}) == 10  # rare clips are all drawn


def test_balanced_sampler_is_seeded_and_changes_per_epoch():
    labels = [[i % 5, (i + 1) % 5] for i in range(50)]
    a = ClassBalancedSampler(labels, 5, seed=3, num_replicas=1, rank=0)
    b = ClassBalancedSampler(labels, 5, seed=3, num_replicas=1, rank=0)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)


def test_balanced_sampler_shards_between_ranks():
    labels = [[i % 4] for i in range(101)]
    shards = [list(ClassBalancedSampler(labels, 4, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51
    full = ClassBalancedSampler(labels, 4, seed=0, num_replicas=1, rank=0).epoch_queue(0)
    assert shards[0][:50] == full[0::2][:50] and shards[1][:50] == full[1::2][:50]


def test_balanced_queue_under_accelerate_sharding_gives_each_rank_its_own_batches():
    """As under `accelerate launch` with HTSATTrainer: every rank builds the same queue (num_replicas=1) and
    Accelerate's batch sharding hands rank r batches r, r + 2, ...; set_epoch reaches the sampler through it."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    labels = [[0]] * 12 + [[1]] * 3 + [[2]]  # skewed: 12 / 3 / 1
    seen = {}
    for rank in range(2):
        sampler = ClassBalancedSampler(labels, 3, num_samples=16, seed=5, num_replicas=1, rank=0)
        loader = DataLoader(list(range(16)), batch_size=2, sampler=sampler)
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        for epoch in (0, 1):
            shard.set_epoch(epoch)
            seen[rank, epoch] = [batch.tolist() for batch in shard]
    for epoch in (0, 1):
        queue = sampler.epoch_queue(epoch)
        batches = [queue[i : i + 2] for i in range(0, 16, 2)]
        assert seen[0, epoch] == batches[0::2] and seen[1, epoch] == batches[1::2]
        counts = Counter(labels[i][0] for i in queue)
        assert min(counts.values()) >= 5  # balanced: the single class-2 clip is drawn about a third of the time
    assert seen[0, 0] != seen[0, 1]


def test_balanced_sampler_skips_empty_classes():
    queue = list(ClassBalancedSampler([[0], [0], [2]], 4, seed=0, num_replicas=1, rank=0))
    assert set(queue) <= {0, 1, 2} and len(queue) == 3


# --------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    "epoch, rate",
    [(0, 0.02), (1, 0.05), (2, 0.1), (3, 0.1), (10, 0.1), (11, 0.05), (20, 0.05), (21, 0.02), (30, 0.02),
     (31, 0.03), (99, 0.03)],
)
def test_original_multiplier_per_epoch(epoch, rate):
    assert original_lr_multiplier(epoch) == pytest.approx(rate)


def test_schedule_is_stepped_per_optimizer_step():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    scheduler = get_htsat_schedule(optimizer, steps_per_epoch=4)
    seen = []
    for _ in range(4 * 12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:4] == pytest.approx([2e-5] * 4)
    assert seen[4:8] == pytest.approx([5e-5] * 4)
    assert seen[8] == pytest.approx(1e-4) and seen[4 * 10 + 3] == pytest.approx(1e-4)
    assert seen[4 * 11] == pytest.approx(5e-5)
    assert HTSATLRLambda(4)(4 * 31) == pytest.approx(0.03)
    state = scheduler.state_dict()  # resumable: the lambda is a plain object
    assert state["last_epoch"] == 48


# -------------------------------------------------------------------------------------------------- averaging
def test_average_state_dicts_means_floats_and_keeps_integers():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16),
         "index": torch.tensor([[0, 5], [7, 3]]), "count": torch.tensor(10)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16),
         "index": torch.tensor([[0, 5], [7, 3]]), "count": torch.tensor(13)}
    out = average_state_dicts([a, b])
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0]))
    assert out["h"].dtype == torch.float16 and out["h"].item() == 1.5
    assert out["index"].dtype == torch.int64 and torch.equal(out["index"], a["index"])
    assert out["count"].dtype == torch.int64 and out["count"].item() == 12  # 11.5 rounds to even
    with pytest.raises(ValueError, match="different keys"):
        average_state_dicts([a, {"w": a["w"]}])
