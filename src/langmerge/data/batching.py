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
