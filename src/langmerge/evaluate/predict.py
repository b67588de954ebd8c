"""Batched forward passes over encoded examples: validation scores of a trained model."""

from __future__ import annotations

import math

import torch

from langmerge.data.batching import PadToLongest
from langmerge.data.encode import IGNORE
from langmerge.evaluate.metrics import accuracy, macro_f1


@torch.inference_mode()
def validation_scores(model, encoded: list[dict], kind: str, pad_id: int, batch_size: int) -> dict:
    """Classification: accuracy, macro-F1 and mean loss; generation: the mean loss per target
    token and its perplexity. Batches hold examples of similar length (little padding)."""
    if not encoded:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    collate = PadToLongest(pad_id)
    loss_sum, loss_count = 0.0, 0
    gold, predicted = [], []
    for start in range(0, len(order), batch_size):
        batch = collate([encoded[i] for i in order[start : start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        if kind == "classification":
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            losses = torch.nn.functional.cross_entropy(
                logits.float(), batch["labels"], reduction="sum"
            )
            loss_sum += float(losses)
            loss_count += len(batch["labels"])
            gold += batch["labels"].tolist()
            predicted += logits.argmax(-1).tolist()
        else:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                reduction="sum",
            )  # fmt: skip
            loss_sum += float(losses)
            loss_count += int((targets != IGNORE).sum())
    model.train(was_training)
    loss = loss_sum / max(loss_count, 1)
    if kind == "classification":
        return {"accuracy": accuracy(gold, predicted), "macro_f1": macro_f1(gold, predicted),
                "loss": loss}  # fmt: skip
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
