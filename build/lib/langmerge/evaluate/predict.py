"""Batched forward passes over encoded examples: validation loss and scores, predicted classes,
greedy generation."""

from __future__ import annotations

import math

import torch

from langmerge.data.batching import PadToLongest
from langmerge.data.encode import IGNORE
from langmerge.evaluate.metrics import accuracy, macro_f1


def validation_scores(model, encoded: list[dict], kind: str, pad_id: int, batch_size: int) -> dict:
    """Classification: accuracy, macro-F1 and mean loss; generation: the mean loss per target
    token and its perplexity. Batches hold examples of similar length (little padding)."""
    found = validation_pass(model, encoded, kind, pad_id, batch_size)
    if not found:
        return {}
    loss = found["loss"]
    if kind == "classification":
        gold, predicted = found["gold"], found["predicted"]
        return {"accuracy": accuracy(gold, predicted), "macro_f1": macro_f1(gold, predicted),
                "loss": loss}  # fmt: skip
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.inference_mode()
def validation_pass(model, encoded: list[dict], kind: str, pad_id: int, batch_size: int) -> dict:
    """The mean loss over `encoded` (per example for classification, per target token for
    generation) and, for classification, the gold and predicted class indices in order."""
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
    found = {"loss": loss_sum / max(loss_count, 1)}
    if kind == "classification":
        inverse = sorted(range(len(order)), key=order.__getitem__)  # back to the given order
        found.update(gold=[gold[i] for i in inverse], predicted=[predicted[i] for i in inverse])
    return found


@torch.inference_mode()
def predict_classes(model, encoded: list[dict], pad_id: int, batch_size: int) -> list[int]:
    """The predicted class index of every encoded example, in order."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    collate = PadToLongest(pad_id)
    out = [0] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([encoded[i] for i in idx])
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            out[i] = p
    return out


@torch.inference_mode()
def generate(
    model, prompts: list[list[int]], tokenizer, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers to tokenised prompts (left-padded in batches of similar length), decoded
    without special tokens; every answer stops at `max_new_tokens`."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id
    out = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            ids[row, width - n :] = torch.tensor(prompts[i])
            mask[row, width - n :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            # the model's own stop tokens (an instruct model's end of turn), else the tokenizer's
            eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
        )
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return out
