"""Batches padded to their longest example, never to `max_length`: with length-grouped sampling
the padding nearly vanishes, and the loss of a batch does not depend on it."""

from __future__ import annotations

import torch

from langmerge.data.encode import IGNORE


class PadToLongest:
    """Collate encoded examples: right-pad `input_ids` with `pad_id` and token labels with the
    ignore index; build the attention mask."""

    def __init__(self, pad_id: int, multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(x["input_ids"]) for x in batch)
        width = -(-longest // self.multiple_of) * self.multiple_of
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            n = len(x["input_ids"])
            ids[i, :n] = torch.tensor(x["input_ids"])
            mask[i, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if isinstance(batch[0]["labels"], list):
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            for i, x in enumerate(batch):
                labels[i, : len(x["labels"])] = torch.tensor(x["labels"])
            out["labels"] = labels
        else:
            out["labels"] = torch.tensor([x["labels"] for x in batch])
        return out


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in batches of similar length, batches in random order.

    Each epoch shuffles the examples, sorts each group of `group` batches by length (ties broken
    at random) and shuffles the order of the resulting full batches; a short batch comes last.
    With the default group of 256 batches a language's data is usually sorted whole, which
    leaves almost no padding (HF's sampler sorts groups of 50 batches: much more on small data
    sets). The order depends only on (seed, epoch), so a run resumed mid-epoch skips exactly the
    batches it had trained on; `Trainer` calls `set_epoch` at the start of every epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, group: int = 256):
        self.lengths = torch.tensor(lengths, dtype=torch.float64)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        n, size = len(self.lengths), self.batch_size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=generator)
        jitter = torch.rand(n, generator=generator, dtype=torch.float64) * 0.5  # breaks ties
        batches = []
        for start in range(0, n, size * self.group):
            chunk = order[start : start + size * self.group]
            chunk = chunk[torch.argsort(self.lengths[chunk] + jitter[chunk], descending=True)]
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        # the data loader cuts the stream into batches of `batch_size`: a short one goes last
        full = [b for b in batches if len(b) == size]
        short = [b for b in batches if len(b) < size]
        for b in torch.randperm(len(full), generator=generator).tolist():
            yield from full[b].tolist()
        for b in short:
            yield from b.tolist()
