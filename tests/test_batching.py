"""Batches: length-grouped sampling covers every example once with little padding, and padding
does not change a batch's loss."""

import random

import torch
from tiny import tiny_encoder

from langmerge.data.batching import LengthGroupedSampler, PadToLongest


def padded_fraction(lengths, order, size):
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / padded


def test_every_example_once_per_epoch_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(3, 120) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == list(range(1000)) and first != second  # a new order each epoch
    again = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    again.set_epoch(1)
    assert list(again) == second  # the order depends on (seed, epoch) only: resuming repeats it
    assert padded_fraction(lengths, first, 16) < 0.02
    assert padded_fraction(lengths, list(range(1000)), 16) > 0.4  # random batches: much more


def test_padding_does_not_change_the_loss(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_encoder(tmp_path / "encoder"), num_labels=2
    ).eval()
    batch = [{"input_ids": [2, 5, 6, 7, 3], "labels": 0}, {"input_ids": [2, 9, 3], "labels": 1}]
    short, wide = PadToLongest(0)(batch), PadToLongest(0, multiple_of=32)(batch)
    assert short["input_ids"].shape == (2, 5) and wide["input_ids"].shape == (2, 32)
    with torch.no_grad():
        assert torch.allclose(model(**short).loss, model(**wide).loss, atol=1e-6)
