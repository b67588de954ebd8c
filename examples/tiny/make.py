"""The tiny example project: generated multilingual data (happy / sad sentences in en, de, fr), a
tiny BERT-like encoder and a tiny Llama built from config with word-level tokenizers. No network.

    python examples/tiny/make.py          # builds encoder/ and decoder/ here (and data/)
    langmerge train examples/tiny/recipe.yaml --all

The tests build their projects from this folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = {
    "en": {
        "happy": ["joy", "smile", "sun", "laugh"],
        "sad": ["tears", "rain", "grief", "loss"],
        "filler": ["the", "a", "day", "was", "very", "and", "we", "felt"],
    },
    "de": {
        "happy": ["freude", "lachen", "sonne", "glück"],
        "sad": ["tränen", "regen", "trauer", "leid"],
        "filler": ["der", "die", "tag", "war", "sehr", "und", "wir", "fühlten"],
    },
    "fr": {
        "happy": ["joie", "sourire", "soleil", "rire"],
        "sad": ["larmes", "pluie", "deuil", "perte"],
        "filler": ["le", "la", "jour", "était", "très", "et", "nous", "sentions"],
    },
}
LANGS = list(WORDS)


def sentences(lang: str, n: int, seed: int) -> list[dict]:
    """`n` distinct texts of 3–20 words labelled happy or sad, in `lang`."""
    rng = random.Random(f"{lang}{seed}")
    out, seen = [], set()
    while len(out) < n:
        label = rng.choice(["happy", "sad"])
        words = rng.choices(WORDS[lang]["filler"], k=rng.randint(2, 18))
        words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[lang][label]))
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            out.append({"text": text, "label": label, "target": f"{label} {words[0]}"})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def vocabulary() -> list[str]:
    words = {w for lang in WORDS.values() for ws in lang.values() for w in ws}
    return sorted(words | {"happy", "sad", "answer", ":"})


def word_tokenizer(specials: dict[str, str], template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(dict.fromkeys(specials.values())) + vocabulary()
    tok = Tokenizer(
        models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=specials["unk_token"])
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template:
        ids = [(t, tokens.index(t)) for t in specials.values() if t in template]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=ids)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def tiny_encoder(out: Path, dropout: float = 0.1) -> Path:
    """A 2-layer BERT with a [CLS] … [SEP] word-level tokenizer, pretrained for a few seconds
    (see `pretrain_encoder`), as a real backbone knows its words before anyone fine-tunes it."""
    from transformers import BertConfig

    tokenizer = word_tokenizer(
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"},
        "[CLS] $A [SEP]",
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    pretrain_encoder(config, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pretrain_encoder(config, tokenizer, steps: int = 80):
    """The encoder of a BERT classifier trained on happy and sad sentences of every language
    (other sentences than the examples': another seed). A randomly initialised encoder gives
    features too weak for LoRA to learn from in a few steps: its experts would learn nothing,
    and langmerge's health check would rightly refuse to merge them."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    texts = [x for lang in LANGS for x in sentences(lang, 200, seed=1000)]
    batch = tokenizer([x["text"] for x in texts], padding=True, return_tensors="pt")
    labels = torch.tensor([x["label"] == "sad" for x in texts], dtype=torch.long)
    pretrain(model, {**batch, "labels": labels}, steps)
    return model.bert


def tiny_decoder(out: Path, chat_template: bool = True) -> Path:
    """A 2-layer Llama with a <s>-prefixing word-level tokenizer and a small chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, "<s> $A"
    )
    if chat_template:
        tokenizer.chat_template = (
            "{% for m in messages %}<s> {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} answer :{% endif %}"
        )
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=0, eos_token_id=1, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    examples = [x for lang in LANGS for x in sentences(lang, 200, seed=1000)]
    prompts = tokenizer([f"{x['text']} answer :" for x in examples])["input_ids"]
    answers = tokenizer([f"{x['target']} </s>" for x in examples], add_special_tokens=False)
    ids = [p + a for p, a in zip(prompts, answers["input_ids"])]
    width = max(map(len, ids))
    batch = {"input_ids": torch.tensor([x + [1] * (width - len(x)) for x in ids]),
             "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
             "labels": torch.tensor([[-100] * len(p) + a + [-100] * (width - len(p) - len(a))
                                     for p, a in zip(prompts, answers["input_ids"])])}  # fmt: skip
    pretrain(model, batch, steps=300)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pretrain(model, batch: dict, steps: int) -> None:
    """A few AdamW steps of `model` on random rows of the tensors in `batch` (its labels
    included): a backbone that has seen text like the examples', but not the examples."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    n = len(batch["input_ids"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine and in every process
    model.train()
    try:
        for _ in range(steps):
            pick = torch.randint(n, (16,), generator=order)
            loss = model(**{k: v[pick] for k, v in batch.items()}).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)


HERE = Path(__file__).parent


def write_data(root: Path, n: int = 40) -> None:
    """`n` examples per language in root/data/{en,de,fr}.jsonl."""
    for lang in LANGS:
        write_jsonl(root / "data" / f"{lang}.jsonl", sentences(lang, n, seed=0))


if __name__ == "__main__":
    write_data(HERE)  # the same files as committed: the data is deterministic
    tiny_encoder(HERE / "encoder")
    tiny_decoder(HERE / "decoder")
    print(f"built {HERE / 'encoder'} and {HERE / 'decoder'}")
