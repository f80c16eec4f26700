"""The SFT trainer's count of tokens trained on: exact, and never read from the device at a step."""

import random

import torch

from loraforge.train.sft import TokenCounter


def test_counts_mask_ones_and_unmasked_ids(seed):
    rng = random.Random(seed)
    counter, expected = TokenCounter(), 0
    for _ in range(5):
        rows, cols = rng.randint(1, 4), rng.randint(1, 37)
        mask = (torch.rand(rows, cols, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) > 0.3).long()
        counter.add({"input_ids": torch.zeros(rows, cols, dtype=torch.long), "attention_mask": mask})
        expected += int(mask.sum())
        if rng.random() < 0.3:
            assert counter.value == expected  # a read in between does not count anything twice
    counter.add({"input_ids": torch.zeros(3, 11, dtype=torch.long)})  # no mask: every id
    assert counter.value == expected + 33 and counter.value == expected + 33


def test_adding_reads_nothing_back_from_the_device():
    """Masks on the meta device: any read of a value (int(), .item(), bool()) raises, so adding must
    only queue the sums (the trainer's step then never waits for the device)."""
    counter = TokenCounter()
    for _ in range(3):
        counter.add({"input_ids": torch.empty(2, 9, device="meta"), "attention_mask": torch.ones(2, 9, device="meta")})
    assert counter._pending is not None and counter._pending.device.type == "meta"
