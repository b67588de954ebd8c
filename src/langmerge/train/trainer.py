"""One LoRA fine-tuning run with Hugging Face `Trainer` + PEFT: length-grouped batches padded to
their longest example, checkpoints to resume from, exact counts of the tokens trained on."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from langmerge.backbones import model_class
from langmerge.data.batching import LengthGroupedSampler, PadToLongest
from langmerge.recipe import Recipe

# transformers 5 warns about its own deprecated call, made by PEFT, on every save
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Counts:
    """What a training process has worked through so far; kept by the caller, so the figures
    survive an interruption."""

    tokens: int = 0  # real (unpadded) tokens of the batches trained on
    padded_tokens: int = 0  # tokens including padding
    examples: int = 0
    flops_per_token: float = 0.0

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens


@dataclass
class FitResult:
    model: torch.nn.Module  # the PEFT model, trained
    counts: Counts  # this process's work (a resumed run counts from its checkpoint on)
    steps: int
    resumed_from: int | None  # the checkpoint's step when resuming
    loss: float | None  # mean training loss over the whole run, resumed parts included


def build_peft_model(base_dir: Path, recipe: Recipe, pad_id: int, start: Path | None = None):
    """The base with fresh LoRA adapters (their initialisation drawn from the recipe's seed),
    or with the trained adapters in `start`, to train further."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import set_seed

    kind = recipe.task.kind
    dtype = DTYPES[recipe.training.precision] if torch.cuda.is_available() else torch.float32
    model = model_class(kind).from_pretrained(base_dir, dtype=dtype)
    model.config.pad_token_id = pad_id
    lora = recipe.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=TaskType.SEQ_CLS if kind == "classification" else TaskType.CAUSAL_LM,
    )
    set_seed(recipe.training.seed)
    if start is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start, is_trainable=True)
    else:
        model = get_peft_model(model, config)
    for p in model.parameters():  # a trained head loaded in half precision: train it in fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def fit(
    base_dir: Path,
    recipe: Recipe,
    train: list[dict],
    pad_id: int,
    work: Path,
    progress: bool = True,
    counts: Counts | None = None,
    start: Path | None = None,
) -> FitResult:
    """Train adapters on the encoded examples `train`; checkpoints go to `work`, and a run that
    finds checkpoints there resumes from the newest. `counts` is updated as training goes;
    `start` is a trained adapter to continue from."""
    t = recipe.training
    counts = counts if counts is not None else Counts()
    model = build_peft_model(base_dir, recipe, pad_id, start)
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts.flops_per_token = training_flops(n_linear, n_trainable, 1)
    cuda = torch.cuda.is_available()
    bar = ProgressBar(progress)
    trainer = CountingTrainer(
        counts,
        model=model,
        args=training_arguments(recipe, work),
        train_dataset=train,
        data_collator=PadToLongest(pad_id, multiple_of=8 if cuda else 1),  # GPU kernels like 8
        callbacks=[bar],
    )
    if recipe.task.kind == "classification":
        # the classifiers return a mean loss and ignore the token count the Trainer offers;
        # told they take it, the Trainer would sum accumulated micro-batches instead of averaging
        trainer.model_accepts_loss_kwargs = False
    if t.group_by_length:
        lengths = [len(x["input_ids"]) for x in train]
        trainer.sampler = LengthGroupedSampler(
            lengths, t.batch_size * t.gradient_accumulation, seed=t.seed
        )
    trainer.remove_callback(PrinterCallback)
    checkpoint = latest_checkpoint(work)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        bar.bar.stop()
    _sum_over_processes(counts)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return FitResult(
        model=model,
        counts=counts,
        steps=trainer.state.global_step,
        resumed_from=int(checkpoint.name.split("-")[1]) if checkpoint else None,
        loss=sum(losses) / len(losses) if losses else None,
    )


def _sum_over_processes(counts: Counts) -> None:
    """In a multi-process job every process counted its own batches: make the counts the
    job's totals, on every process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    totals = torch.tensor([counts.tokens, counts.padded_tokens, counts.examples],
                          dtype=torch.float64, device=device)  # fmt: skip
    dist.all_reduce(totals)
    counts.tokens, counts.padded_tokens, counts.examples = (int(x) for x in totals.tolist())


def training_arguments(recipe: Recipe, work: Path) -> TrainingArguments:
    """The `Trainer` settings of a recipe: checkpoints every `checkpoint_steps` into `work`,
    mixed precision on a GPU only, no reporting integrations."""
    t = recipe.training
    cuda = torch.cuda.is_available()
    options = dict(
        output_dir=str(work),
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        seed=t.seed,
        bf16=cuda and t.precision == "bf16",
        fp16=cuda and t.precision == "fp16",
        use_cpu=not cuda,
        save_strategy="steps",
        save_steps=t.checkpoint_steps,
        save_total_limit=1,
        logging_steps=10 if cuda else 1,  # each log waits for the GPU
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    if "warmup_ratio" in inspect.signature(TrainingArguments).parameters:  # transformers 4
        options["warmup_ratio"] = t.warmup_ratio
    else:  # transformers 5 reads a fraction from warmup_steps
        options["warmup_steps"] = t.warmup_ratio
    return TrainingArguments(**options)


def training_flops(n_linear: int, n_trainable: int, tokens: int) -> float:
    """Estimated training FLOPs: 2·N per token forward and 2·N backward through every linear
    weight (N = `n_linear`), plus 2 per trainable weight for its gradient. Attention scores and
    element-wise work are left out (small at the sequence lengths of LoRA fine-tuning)."""
    return float((4 * n_linear + 2 * n_trainable) * tokens)


def latest_checkpoint(work: Path) -> Path | None:
    """The newest complete `checkpoint-N` in `work`, or None."""
    done = [
        p
        for p in Path(work).glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


class CountingTrainer(Trainer):
    """A `Trainer` that counts the tokens and examples of every batch it trains on."""

    def __init__(self, counts: Counts, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = counts
        self.sampler = None  # set to sample training batches in another order

    def _get_train_sampler(self, *args, **kwargs):
        return self.sampler or super()._get_train_sampler(*args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        mask = inputs["attention_mask"]
        self.counts.tokens += int(mask.sum())
        self.counts.padded_tokens += mask.numel()
        self.counts.examples += mask.shape[0]
        return super().training_step(model, inputs, *args, **kwargs)


class ProgressBar(TrainerCallback):
    """Training steps as a rich progress bar, with the latest loss."""

    def __init__(self, enabled: bool):
        self.bar = Progress(
            TextColumn("training"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            disable=not enabled,
            transient=True,
        )
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar.start()
        self.task = self.bar.add_task("", total=state.max_steps, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.task is not None:
            self.bar.update(self.task, description=f"loss {logs['loss']:.4f}")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(self.task, completed=state.global_step)
