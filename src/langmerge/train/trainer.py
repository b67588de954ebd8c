"""One LoRA fine-tuning run with Hugging Face `Trainer` + PEFT: length-grouped batches padded to
their longest example, checkpoints to resume from, exact counts of the tokens trained on."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from langmerge.data.batching import LengthGroupedSampler, PadToLongest
from langmerge.errors import InputError
from langmerge.evaluate.metrics import accuracy, macro_f1
from langmerge.evaluate.predict import validation_pass
from langmerge.models.backbones import load_weights, model_class
from langmerge.processes import world_size
from langmerge.train.settings import FitSettings

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
    damaged: list[str]  # newer checkpoints that were unreadable, and why
    loss: float | None  # mean training loss over the whole run, resumed parts included
    last_loss: float | None = None  # the last logged training loss (NaN when it diverged)
    curve: list[dict] | None = None  # validation at step 0, each epoch (or eval_steps), the end
    best_step: int | None = None  # the step whose weights the model holds now


def build_peft_model(base_dir: Path, settings: FitSettings, pad_id: int, start: Path | None = None):
    """The base with fresh LoRA adapters (their initialisation drawn from the training seed),
    or with the trained adapters in `start`, to train further."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import set_seed

    kind = settings.task_kind
    dtype = DTYPES[settings.training.precision] if torch.cuda.is_available() else torch.float32
    model = load_weights(lambda p: model_class(kind).from_pretrained(p, dtype=dtype), base_dir)
    model.config.pad_token_id = pad_id
    lora = settings.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=TaskType.SEQ_CLS if kind == "classification" else TaskType.CAUSAL_LM,
    )
    set_seed(settings.training.seed)
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
    settings: FitSettings,
    train: list[dict],
    pad_id: int,
    work: Path,
    progress: bool = True,
    counts: Counts | None = None,
    start: Path | None = None,
    validation: dict[str, list[dict]] | None = None,
    kind: str = "expert",
    leader: bool = True,
    steps: int | None = None,
) -> FitResult:
    """Train adapters on the encoded examples `train` for the step budget of a `kind`
    job; checkpoints go to `work`, and a run that finds checkpoints there resumes from the
    newest. With `validation` (language → encoded examples) the model is scored before training,
    each epoch (or `eval_steps`) and at the end, and ends with the weights of the best step.
    `counts` is updated as training goes; `start` is a trained adapter to continue from; `steps`
    replaces that budget."""
    t = settings.training
    counts = counts if counts is not None else Counts()
    model = build_peft_model(base_dir, settings, pad_id, start)
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts.flops_per_token = training_flops(n_linear, n_trainable, 1)
    cuda = torch.cuda.is_available()
    bar = ProgressBar(progress)
    callbacks = [bar]
    best = None
    if validation:
        best = BestCheckpoint(model, validation, settings, pad_id, work, leader)
        callbacks.append(best)
    trainer = CountingTrainer(
        counts,
        model=model,
        args=training_arguments(
            settings, work, steps if steps is not None else t.budget(kind, len(train), world_size())
        ),
        train_dataset=train,
        data_collator=PadToLongest(pad_id, multiple_of=8 if cuda else 1),  # GPU kernels like 8
        callbacks=callbacks,
    )
    if settings.task_kind == "classification":
        # the classifiers return a mean loss and ignore the token count the Trainer offers;
        # told they take it, the Trainer would sum accumulated micro-batches instead of averaging
        trainer.model_accepts_loss_kwargs = False
    if t.group_by_length:
        lengths = [len(x["input_ids"]) for x in train]
        trainer.sampler = LengthGroupedSampler(
            lengths, t.batch_size * t.gradient_accumulation, seed=t.seed
        )
    trainer.remove_callback(PrinterCallback)
    checkpoint, damaged = latest_checkpoint(work)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as e:
        resumed = int(checkpoint.name.split("-")[1]) if checkpoint else None
        if resumed is None or trainer.state.global_step > resumed:
            raise
        raise InputError(  # it failed while resuming: the checkpoint is not usable
            f"cannot resume from {checkpoint} ({type(e).__name__}: {str(e)[:200]}); delete "
            "that folder and run the same command again (it resumes from an earlier checkpoint "
            "or starts afresh)"
        ) from None
    finally:
        bar.bar.stop()
    _sum_over_processes(counts)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    best_step = best.finish(steps, t.best_checkpoint) if best else steps
    return FitResult(
        model=model,
        counts=counts,
        steps=steps,
        resumed_from=int(checkpoint.name.split("-")[1]) if checkpoint else None,
        damaged=damaged,
        loss=sum(losses) / len(losses) if losses else None,
        last_loss=losses[-1] if losses else None,
        curve=best.curve if best else None,
        best_step=best_step,
    )


class BestCheckpoint(TrainerCallback):
    """Scores the model on validation data before training, at each epoch's end (or every
    `eval_steps`) and at the end; keeps the trainable weights of the best step on disk
    (`work`/best.safetensors, with the curve in `work`/curve.json, so a resumed run knows them)
    and puts them back at the end. Classification is ranked by the primary metric (mean over
    languages; ties: lower loss), generation by validation loss."""

    def __init__(self, model, validation: dict[str, list[dict]], settings: FitSettings, pad_id: int,
                 work: Path, leader: bool):  # fmt: skip
        self.model, self.validation, self.pad_id, self.leader = model, validation, pad_id, leader
        self.kind = settings.task_kind
        self.metric = settings.metric if self.kind == "classification" else None
        self.batch_size = settings.eval_batch_size
        self.eval_steps = settings.training.eval_steps
        self.work = Path(work)
        self.curve: list[dict] = []
        self.best: dict | None = None
        self.weights: dict[str, torch.Tensor] | None = None  # the best step's, in memory

    def on_train_begin(self, args, state, control, **kwargs):
        saved = self._read()
        resumed = state.global_step
        self.curve = [p for p in saved.get("curve", []) if p["step"] <= resumed]
        best = saved.get("best")
        if best and best["step"] <= resumed and (self.work / "best.safetensors").is_file():
            from safetensors.torch import load_file

            self.best, self.weights = best, load_file(self.work / "best.safetensors")
        if resumed == 0 and not self.curve:
            self._evaluate(0, 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self._evaluate(state.global_step, state.epoch)

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.eval_steps:
            self._evaluate(state.global_step, state.epoch)

    def finish(self, steps: int, keep_best: bool) -> int:
        """Score the last step if not yet done; with `keep_best`, load the best step's weights.
        Returns the step whose weights the model now holds."""
        if not self.curve or self.curve[-1]["step"] != steps:
            self._evaluate(steps, None)
        if not keep_best or self.best is None or self.best["step"] == steps:
            return steps
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        return self.best["step"]

    def _evaluate(self, step: int, epoch: float | None) -> None:
        if self.curve and self.curve[-1]["step"] == step:
            return
        per_language = {}
        for code, encoded in self.validation.items():
            found = validation_pass(self.model, encoded, self.kind, self.pad_id, self.batch_size)
            scores = {"loss": found["loss"]}
            if self.kind == "classification":
                scores["accuracy"] = accuracy(found["gold"], found["predicted"])
                scores["macro_f1"] = macro_f1(found["gold"], found["predicted"])
            per_language[code] = scores
        n = len(per_language)
        point = {"step": step, "epoch": epoch,
                 "loss": sum(s["loss"] for s in per_language.values()) / n}  # fmt: skip
        if self.metric:
            point[self.metric] = sum(s[self.metric] for s in per_language.values()) / n
        self.curve.append(point)
        if step > 0 and math.isfinite(point["loss"]) and (self.best is None or self._better(
                point, self.best)):  # fmt: skip
            self.best = point
            self.weights = {
                name: p.detach().to("cpu", copy=True)
                for name, p in self.model.named_parameters()
                if p.requires_grad
            }
            if self.leader:
                from safetensors.torch import save_file

                self.work.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in self.weights.items()},
                          self.work / "best.safetensors")  # fmt: skip
        if self.leader:
            self.work.mkdir(parents=True, exist_ok=True)
            (self.work / "curve.json").write_text(
                json.dumps({"curve": self.curve, "best": self.best}, indent=1)
            )

    def _better(self, a: dict, b: dict) -> bool:
        if self.metric is None:
            return a["loss"] < b["loss"]
        return (a[self.metric], -a["loss"]) > (b[self.metric], -b["loss"])

    def _read(self) -> dict:
        try:
            return json.loads((self.work / "curve.json").read_text())
        except (OSError, ValueError):
            return {}


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


def training_arguments(settings: FitSettings, work: Path, steps: int) -> TrainingArguments:
    """The `Trainer` settings for a run of `steps` optimiser steps: checkpoints every
    `checkpoint_steps` into `work`, mixed precision on a GPU only, no reporting integrations."""
    t = settings.training
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(work),
        max_steps=steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type="constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        warmup_steps=round(t.warmup_ratio * steps),
        weight_decay=t.weight_decay,
        seed=t.seed,
        bf16=cuda and t.precision == "bf16",
        fp16=cuda and t.precision == "fp16",
        use_cpu=not cuda,
        save_strategy="steps",
        save_steps=t.checkpoint_steps,
        save_total_limit=2,  # the one before the newest, should the newest be damaged
        logging_steps=10 if cuda else 1,  # each log waits for the GPU
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def training_flops(n_linear: int, n_trainable: int, tokens: int) -> float:
    """Estimated training FLOPs: 2·N per token forward and 2·N backward through every linear
    weight (N = `n_linear`), plus 2 per trainable weight for its gradient. Attention scores and
    element-wise work are left out (small at the sequence lengths of LoRA fine-tuning)."""
    return float((4 * n_linear + 2 * n_trainable) * tokens)


def latest_checkpoint(work: Path) -> tuple[Path | None, list[str]]:
    """The newest complete and readable `checkpoint-N` in `work` (or None), and what was wrong
    with the newer ones (left in place: training overwrites them when it gets there again)."""
    done = [
        p
        for p in Path(work).glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    damaged = []
    for p in sorted(done, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = checkpoint_problem(p)
        if problem is None:
            return p, damaged
        damaged.append(f"{p.name}: {problem}")
    return None, damaged


def checkpoint_problem(folder: Path) -> str | None:
    """What makes a checkpoint unreadable (a truncated or corrupted file), or None. PyTorch's
    files are zip archives whose checksums are tested; nothing is unpickled."""
    import zipfile

    from safetensors import safe_open

    for f in sorted(folder.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as st:
                    for key in st.keys():  # noqa: SIM118 (safe_open is no mapping)
                        st.get_tensor(key)
            elif f.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(f) as z:
                    if (bad := z.testzip()) is not None:
                        return f"{f.name} is corrupt ({bad})"
        except Exception as e:  # json, safetensors and zip raise several kinds
            return f"{f.name} is unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


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
