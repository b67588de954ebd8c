"""Training throughput benchmark: langmerge's expert training vs a plain HF `Trainer` that pads.

What it measures
    One LoRA fine-tuning epoch of a small BERT-like classifier (hidden 256, 4 layers, 4 heads,
    FF 1024, random weights from a fixed seed; word-level tokenizer built locally; both under
    bench/work/train_throughput/) on generated texts of skewed length (4-120 words, log-normal,
    median ~20; Zipf-distributed words; a label marker word per text), max_length 128.
    Every contender gets the same base, the same LoRA (r=8, alpha 16, query/value; built by
    `langmerge.train.trainer.build_peft_model`, so the same initialisation), the same
    hyper-parameters, batch 16, 1 epoch, 2 torch threads, in this one process, one after another:
      - langmerge         `langmerge.train.trainer.fit`: length-grouped sampling, `PadToLongest`
      - hf_pad_max_length the standard HF recipe: `tokenizer(padding="max_length",
                          truncation=True, max_length=128)`, random batches, default collator
      - hf_pad_longest    random batches, `DataCollatorWithPadding` (pad to the batch's longest)
    The HF runs use `fit`'s settings (`training_arguments`) with random sampling. To count tokens
    they use langmerge's `CountingTrainer`, a `Trainer` that only adds two counters per step.
    Wall time covers what `fit` does: model load, LoRA wrap, the epoch, the final checkpoint;
    tokenisation is outside it for all. Tokens/s counts real (unpadded) tokens: the same total
    for everyone, since every example is trained on once.

    Loss parity: on fixed random batches (the same examples), the loss and the LoRA gradients of
    the model (eval mode, fp32, a non-zero adapter) collated by `PadToLongest` and padded to
    max_length; max |difference| of each.

Goal: langmerge tokens/s / hf_pad_max_length tokens/s >= 1.3, with identical loss on the same
    batches (max |loss diff| <= 1e-5).

How to run (from the repo root)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_throughput.py           # 1000 examples, ~1-2 min
    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_throughput.py --quick   # 192 examples: smoke run
    options: --repeat N (min wall kept), --wait-idle S (wait for a quiet machine before each run)
    Results: a table on stdout and bench/results/train_throughput[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psutil
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    PrinterCallback,
    default_data_collator,
)

from langmerge.data.batching import PadToLongest
from langmerge.data.encode import encode
from langmerge.data.prepare import Example
from langmerge.models.backbones import quiet_transformers
from langmerge.project.recipe import Lora, Recipe, Task, Training
from langmerge.train.trainer import (
    CountingTrainer,
    build_peft_model,
    fit,
    training_arguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import busy_cpu_s, machine_info, wait_idle  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "train_throughput"

MODEL = {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024, "vocab_words": 4000}
LABELS = ["neg", "pos"]
MARKERS = {"neg": ["awful", "grim", "bleak", "sour"], "pos": ["great", "bright", "sweet", "warm"]}
MAX_LENGTH = 128
BATCH = 16
THREADS = 2
SEED = 1234
GOAL_RATIO = 1.3
LOSS_TOL = 1e-5
FULL = {"examples": 1000, "parity_batches": 8}
QUICK = {"examples": 192, "parity_batches": 3}


def make_texts(n: int, seed: int) -> list[Example]:
    """`n` texts of 4-120 words with a skewed (log-normal) length and Zipf-distributed words;
    the label is carried by one marker word."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(MODEL["vocab_words"])]
    zipf = [1 / (rank + 1) for rank in range(len(words))]
    out = []
    for _ in range(n):
        length = min(120, max(4, round(rng.lognormvariate(3.0, 0.7))))
        label = rng.choice(LABELS)
        text = rng.choices(words, weights=zipf, k=length - 1)
        text.insert(rng.randrange(length), rng.choice(MARKERS[label]))
        out.append(Example(text=" ".join(text), answer=label))
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level `[CLS] … [SEP]` tokenizer over the generated vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
    }
    markers = [w for ws in MARKERS.values() for w in ws]
    tokens = [*specials.values(), *markers, *(f"w{i}" for i in range(MODEL["vocab_words"]))]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def build_base(root: Path) -> Path:
    """The base classifier (random weights, seeded head) and its tokenizer, built once."""
    marker = root / "spec.json"
    want = {**MODEL, "seed": SEED, "labels": LABELS, "max_length": MAX_LENGTH}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    tokenizer = build_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=MODEL["hidden"],
        num_hidden_layers=MODEL["layers"],
        num_attention_heads=MODEL["heads"],
        intermediate_size=MODEL["intermediate"],
        max_position_embeddings=MAX_LENGTH,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={x: i for i, x in enumerate(LABELS)},
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    BertForSequenceClassification(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    marker.write_text(json.dumps(want))
    return root


def make_recipe(base_dir: Path) -> Recipe:
    """The recipe every contender trains with (its data entry is never read)."""
    return Recipe(
        base=str(base_dir),
        task=Task(kind="classification", labels=LABELS),
        languages={"en": {"data": "unused.jsonl"}},
        lora=Lora(r=8, alpha=16, dropout=0.05, target_modules=["query", "value"]),
        training=Training(
            epochs=1, batch_size=BATCH, max_length=MAX_LENGTH, seed=SEED, threads=THREADS
        ),
    )


def hf_records(tokenizer, texts: list[str], labels: list[int], **options) -> list[dict]:
    """The standard HF encoding: the tokenizer's outputs per example, plus its label."""
    enc = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, **options)
    return [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(texts))]


def timed(run: Callable[[], dict], wait_s: float) -> dict:
    """Run `run()` and add its wall time and the CPU time the rest of the machine used meanwhile
    (a noise indicator on a shared machine)."""
    if wait_s > 0:
        wait_idle(wait_s)
    me = psutil.Process()
    busy0, own0, t0 = busy_cpu_s(), sum(me.cpu_times()[:2]), time.perf_counter()
    res = run()
    wall = time.perf_counter() - t0
    other = busy_cpu_s() - busy0 - (sum(me.cpu_times()[:2]) - own0)
    return {**res, "wall_s": wall, "other_cpu_s": max(0.0, other)}


def run_langmerge(
    out: Path, base_dir: Path, recipe: Recipe, train: list[dict], pad_id: int
) -> dict:
    """langmerge's training of an expert, as `langmerge train` runs it."""
    r = fit(base_dir, recipe.fit_settings(), train, pad_id, out, progress=False)
    return {
        "tokens": r.tokens,
        "padded_tokens": r.padded_tokens,
        "examples": r.examples,
        "steps": r.steps,
        "train_loss": r.loss,
    }


def run_hf(
    out: Path, base_dir: Path, recipe: Recipe, train: list[dict], pad_id: int, collator
) -> dict:
    """A `Trainer` on the same model and data, random batches collated by `collator`."""
    model = build_peft_model(base_dir, recipe.fit_settings(), pad_id)
    trainer = CountingTrainer(
        model=model,
        args=training_arguments(
            recipe.fit_settings(), out, recipe.training.budget("expert", len(train))
        ),
        train_dataset=train,
        data_collator=collator,
    )
    trainer.remove_callback(PrinterCallback)  # as `fit` does
    output = trainer.train()
    return {
        "tokens": trainer.tokens,
        "padded_tokens": trainer.padded_tokens,
        "examples": trainer.examples,
        "steps": trainer.state.global_step,
        "train_loss": float(output.training_loss),
        "train_runtime_s": output.metrics["train_runtime"],
    }


def loss_parity(
    base_dir: Path, recipe: Recipe, ours: list[dict], padded: list[dict], pad_id: int, n: int
) -> dict:
    """Loss and LoRA gradients on `n` random batches, collated by `PadToLongest` and padded to
    max_length (eval mode, fp32, adapter B matrices set to non-zero values)."""
    model = build_peft_model(base_dir, recipe.fit_settings(), pad_id).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(batch: dict) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainable]

    order = torch.randperm(len(ours), generator=g).tolist()
    loss_diff = grad_diff = grad_max = 0.0
    losses = []
    for b in range(n):
        idx = order[b * BATCH : (b + 1) * BATCH]
        l1, g1 = loss_and_grads(PadToLongest(pad_id)([ours[i] for i in idx]))
        l2, g2 = loss_and_grads(default_data_collator([padded[i] for i in idx]))
        losses.append(l1)
        loss_diff = max(loss_diff, abs(l1 - l2))
        grad_diff = max(grad_diff, max(float((a - c).abs().max()) for a, c in zip(g1, g2)))
        grad_max = max(grad_max, max(float(a.abs().max()) for a in g1))
    return {
        "params": sum(
            p.numel() for p in model.get_base_model().parameters() if not p.requires_grad
        ),
        "batches": n,
        "batch_size": BATCH,
        "losses": losses,
        "loss_max_abs_diff": loss_diff,
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": grad_max,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="192 examples (smoke run)")
    p.add_argument("--repeat", type=int, default=1, help="runs per contender (min wall kept)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        help="max seconds to wait for a quiet machine before each run (default 60, quick 0)",
    )
    p.add_argument("--json", type=Path, default=None, help="results file")
    a = p.parse_args()
    spec = QUICK if a.quick else FULL
    wait_s = a.wait_idle if a.wait_idle is not None else (0 if a.quick else 60)
    json_path = a.json or BENCH / "results" / f"train_throughput{'_quick' if a.quick else ''}.json"
    quiet_transformers()
    torch.set_num_threads(THREADS)

    base_dir = build_base(WORK / "base")
    recipe = make_recipe(base_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id
    examples = make_texts(spec["examples"], SEED)
    texts = [e.text for e in examples]
    labels = [LABELS.index(e.answer) for e in examples]
    ours = encode(examples, tokenizer, recipe.task, LABELS, MAX_LENGTH)
    padded = hf_records(tokenizer, texts, labels, padding="max_length")
    unpadded = hf_records(tokenizer, texts, labels)
    lengths = sorted(len(x["input_ids"]) for x in ours)
    assert all(x["input_ids"] == y["input_ids"] for x, y in zip(ours, unpadded))

    # first, as it also warms up the kernels, thread pools and lazy imports the runs use
    parity = loss_parity(base_dir, recipe, ours, padded, pad_id, spec["parity_batches"])

    contenders = {
        "langmerge": (run_langmerge, ours),
        "hf_pad_max_length": (partial(run_hf, collator=default_data_collator), padded),
        "hf_pad_longest": (partial(run_hf, collator=DataCollatorWithPadding(tokenizer)), unpadded),
    }
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    out = WORK / "out"
    for i in range(a.repeat):
        for name, (run, data) in contenders.items():
            print(f"[{i + 1}/{a.repeat}] {name} …", flush=True)
            shutil.rmtree(out, ignore_errors=True)  # fit resumes from checkpoints it finds there
            runs[name].append(timed(partial(run, out, base_dir, recipe, data, pad_id), wait_s))
    shutil.rmtree(out, ignore_errors=True)

    best = {name: min(rs, key=lambda r: r["wall_s"]) for name, rs in runs.items()}
    assert all(r["tokens"] == sum(lengths) for r in best.values()), "every example once"
    for r in best.values():
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
        r["padding_fraction"] = 1 - r["tokens"] / r["padded_tokens"]
    lm = best["langmerge"]["tokens_per_s"]
    ratios = {
        "langmerge/hf_pad_max_length": lm / best["hf_pad_max_length"]["tokens_per_s"],
        "langmerge/hf_pad_longest": lm / best["hf_pad_longest"]["tokens_per_s"],
    }
    results = {
        "benchmark": "train_throughput",
        "mode": "quick" if a.quick else "full",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(("transformers", "peft", "langmerge")),
        "model": {**MODEL, "params": parity.pop("params")},
        "settings": {
            "examples": len(ours),
            "max_length": MAX_LENGTH,
            "batch_size": BATCH,
            "threads": THREADS,
            "repeat": a.repeat,
            "recipe": recipe.model_dump(mode="json", include={"lora", "training"}),
            "wall": "min over repeats; model load + LoRA wrap + 1 epoch + final checkpoint",
            "tokens_per_s": "real (unpadded) tokens / wall",
        },
        "data": {
            "tokens": sum(lengths),
            "mean_len": statistics.mean(lengths),
            "median_len": statistics.median(lengths),
            "p90_len": lengths[int(0.9 * (len(lengths) - 1))],
            "max_len": lengths[-1],
        },
        "runs": best,
        "all_runs": runs,
        "ratios": ratios,
        "parity": parity,
        "goals": {
            "langmerge/hf_pad_max_length >= 1.3": ratios["langmerge/hf_pad_max_length"]
            >= GOAL_RATIO,
            f"loss_max_abs_diff <= {LOSS_TOL:g}": parity["loss_max_abs_diff"] <= LOSS_TOL,
        },
    }
    report(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {json_path}")
    return 0


def report(res: dict) -> None:
    """Print the table, the ratios against the goal, and the parity check."""
    d = res["data"]
    print(
        f"\n{res['settings']['examples']} examples, {d['tokens']} tokens (length mean "
        f"{d['mean_len']:.1f}, median {d['median_len']}, p90 {d['p90_len']}, max {d['max_len']})"
    )
    head = f"{'contender':<20}{'wall s':>8}{'tokens/s':>10}{'padding':>9}{'steps':>7}{'loss':>8}"
    print(f"\n{head}{'other CPU s':>13}")
    for name, r in res["runs"].items():
        print(
            f"{name:<20}{r['wall_s']:>8.2f}{r['tokens_per_s']:>10.0f}{r['padding_fraction']:>9.1%}"
            f"{r['steps']:>7}{r['train_loss']:>8.4f}{r['other_cpu_s']:>13.1f}"
        )
    if res["mode"] == "quick":
        print("(quick mode: few steps, so fixed costs weigh more; the goal is for the full run)")
    for k, v in res["ratios"].items():
        goal = f"  (goal >= {GOAL_RATIO:g}: {'met' if v >= GOAL_RATIO else 'MISSED'})"
        print(f"  {k:<30}{v:>6.2f}×{goal if k.endswith('max_length') else ''}")
    pr = res["parity"]
    print(
        f"  same batches, PadToLongest vs max_length: max |loss diff| "
        f"{pr['loss_max_abs_diff']:.2g} over {pr['batches']} batches of {pr['batch_size']} "
        f"(goal <= {LOSS_TOL:g}: {'met' if pr['loss_max_abs_diff'] <= LOSS_TOL else 'MISSED'}); "
        f"max |grad diff| {pr['grad_max_abs_diff']:.2g} (max |grad| {pr['grad_max_abs']:.2g})"
    )


if __name__ == "__main__":
    sys.exit(main())
