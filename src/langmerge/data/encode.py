"""Examples to token ids for the task: a label id per text (classification), or prompt + target
with the loss on the target tokens only (generation)."""

from __future__ import annotations

from collections.abc import Sequence

from langmerge.data.prepare import Example
from langmerge.data.spec import Task

IGNORE = -100  # label of tokens the loss skips (the prompt, padding)


def encode(
    examples: Sequence[Example], tokenizer, task: Task, labels: list[str] | None, max_length: int
) -> list[dict]:
    """One `{"input_ids": [...], "labels": ...}` per example, at most `max_length` tokens."""
    if not examples:
        return []
    if task.kind == "classification":
        index = {label: i for i, label in enumerate(labels)}
        ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)[
            "input_ids"
        ]
        return [{"input_ids": x, "labels": index[e.answer]} for x, e in zip(ids, examples)]
    return [_generation(e, tokenizer, task, max_length) for e in examples]


def prompt_ids(text: str, tokenizer, task: Task) -> list[int]:
    """The tokens a generation model reads before its answer (chat template when it has one)."""
    if task.chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def _generation(e: Example, tokenizer, task: Task, max_length: int) -> dict:
    prompt = prompt_ids(e.text, tokenizer, task)
    target = tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # keep the target whole when it fits in half the budget; cut the prompt from the left
    target = target[: max(max_length - len(prompt), max_length // 2)]
    prompt = prompt[max(0, len(prompt) + len(target) - max_length) :]
    return {"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target}


def truncated_share(examples: Sequence[Example], tokenizer, task: Task, max_length: int) -> float:
    """The share of `examples` longer than `max_length` tokens, which encoding cuts. A text of
    more than 16 characters per allowed token is counted without tokenising it whole."""
    if not examples:
        return 0.0
    cap = 16 * max_length
    cut = 0
    for e in examples:
        text = e.text if len(e.text) <= cap else e.text[:cap]
        if task.kind == "classification":
            n = len(tokenizer(text)["input_ids"])
        else:
            answer = tokenizer(e.answer[:cap], add_special_tokens=False)["input_ids"]
            n = len(prompt_ids(text, tokenizer, task)) + len(answer) + 1
        cut += n > max_length or len(e.text) > cap
    return cut / len(examples)
