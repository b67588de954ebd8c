"""From a data spec (what a recipe says of its data) to per-language train/validation/test
examples: read, normalise to the task, split, check, hash.

Splits not given are carved by a hash of each example's text and the recipe's split seed, so an
example keeps its split when data is added later, and copies of one text always share a split.
Every problem found is reported at once, so one run of `langmerge check` lists them all.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from langmerge.data.sources import Records, read_file, read_hub
from langmerge.data.spec import DataSpec, LanguageData, Task, prompt_fields
from langmerge.errors import InputError

SPLITS = ("train", "validation", "test")
MAX_CHARS = 1_000_000  # per field: far beyond what any max_length reads, short of memory trouble


@dataclass(frozen=True)
class Example:
    """One example: the text the model reads (for generation, the filled-in prompt) and the
    answer it learns (a label, or the target text)."""

    text: str
    answer: str


@dataclass
class LanguageSplits:
    language: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    digest: str = ""  # the data hash: changes whenever anything training or evaluation sees does
    split_digests: dict[str, str] = field(default_factory=dict)  # one split's examples (+ labels)

    def split(self, name: str) -> list[Example]:
        return getattr(self, name)


@dataclass
class ProjectData:
    """Every language's examples, the label set, and what is wrong with them."""

    languages: dict[str, LanguageSplits]
    labels: list[str] | None  # classification only
    problems: list[str] = field(default_factory=list)  # errors: training refuses to start
    warnings: list[str] = field(default_factory=list)
    not_read: dict[str, str] = field(default_factory=dict)  # language → why (hub data in check)

    def require_valid(self) -> ProjectData:
        if self.problems:
            raise InputError(
                "the recipe's data has problems:\n" + "\n".join(f"  {p}" for p in self.problems)
            )
        return self

    def joint_digest(self) -> str:
        """The data hash of the joint model: all languages' data together."""
        return _hash([f"{code}:{d.digest}" for code, d in sorted(self.languages.items())])


def load_data(spec: DataSpec, languages: list[str] | None = None, hub: bool = True) -> ProjectData:
    """Read and check the data of `languages` (default all); `hub=False` skips hub data sets."""
    codes = list(spec.languages) if languages is None else languages
    unknown = [c for c in codes if c not in spec.languages]
    if unknown:
        raise InputError(
            f"the recipe has no language {', '.join(unknown)}; it has {', '.join(spec.languages)}"
        )
    problems: list[str] = []
    warnings: list[str] = []
    out: dict[str, LanguageSplits] = {}
    not_read: dict[str, str] = {}
    shared: dict[str, Records] | None = None
    for code in codes:
        source = spec.source(code)
        if source.hub is not None and not hub:
            not_read[code] = f"hub data set {source.hub.id} (read when training)"
            continue
        if source is spec.shared:
            if shared is None:
                shared = _read_source(source)
                _check_language_field(shared, spec, problems, warnings)
            raw = {
                split: [r for r in records if str(r.get(spec.language_field)) == code]
                for split, records in shared.items()
            }
        else:
            raw = _read_source(source)
        more = [r for path in spec.languages[code].more for r in _read_more(path)]
        if more:
            raw["more"] = more
        out[code] = _prepare_language(code, raw, spec, problems, warnings)
    labels = None
    if spec.task.kind == "classification":
        if spec.task.labels is None and not_read:
            labels = None  # taken from the data, some of which is read only when training
        else:
            labels = _labels(spec.task, out, problems, warnings)
    elif spec.task.labels:  # labels as generated text: every target must be one of them
        _labels(spec.task, out, problems, warnings)
    for d in out.values():  # the label set and its order decide the head: part of every hash
        d.digest = _hash(
            [spec.split.model_dump_json(), json.dumps(labels)]
            + [f"{s}\t{e.text}\t{e.answer}" for s in SPLITS for e in d.split(s)]
        )
        d.split_digests = {  # what a score on one split depends on (evaluations are keyed so)
            s: _hash([json.dumps(labels)] + [f"{e.text}\t{e.answer}" for e in d.split(s)])
            for s in SPLITS
        }
    return ProjectData(out, labels, problems, warnings, not_read)


def count_table(data: ProjectData) -> list[dict]:
    """One row per language: examples per split, labels seen, mean text length, data hash."""
    rows = []
    for code, d in data.languages.items():
        row = {"language": code, **{s: len(d.split(s)) for s in SPLITS}}
        answers = Counter(e.answer for e in d.train)
        if data.labels is not None:
            row["labels"] = f"{len(answers)}/{len(data.labels)}"
            row["rarest"] = min(answers.values(), default=0)
        else:
            row["target chars"] = _mean(len(e.answer) for e in d.train)
        row["text chars"] = _mean(len(e.text) for e in d.train)
        row["hash"] = d.digest[:12]
        rows.append(row)
    return rows


def _read_more(path: Path) -> Records:
    records = read_file(path)
    if isinstance(records, dict):
        raise InputError(
            f"{path} holds several splits; added data is one file, split by the recipe"
        )
    return records


def _read_source(source: LanguageData) -> dict[str, Records]:
    """Records per split name; `data:` (to be carved) comes as the split "all"."""
    if source.hub is not None:
        return read_hub(source.hub)
    if source.data is not None:
        records = read_file(source.data)
        if isinstance(records, dict):  # a saved DatasetDict: its splits as given
            extra = set(records) - set(SPLITS)
            if extra or "train" not in records:
                raise InputError(
                    f"{source.data} holds splits {sorted(records)}; langmerge reads train "
                    "(required), validation and test"
                )
            return records
        return {"all": records}
    out = {}
    for name in SPLITS:
        path: Path | None = getattr(source, name)
        if path is not None:
            records = read_file(path)
            if isinstance(records, dict):
                raise InputError(f"{path} holds several splits; give it as `data:`")
            out[name] = records
    return out


def _check_language_field(
    shared: dict[str, Records], spec: DataSpec, problems: list[str], warnings: list[str]
) -> None:
    key = spec.language_field
    found = Counter(str(r.get(key)) for records in shared.values() for r in records)
    if "None" in found:
        problems.append(f"{found['None']} records of the shared data have no {key!r} field")
    others = {k: n for k, n in found.items() if k != "None" and k not in spec.languages}
    if others:
        warnings.append(
            "the shared data's records of languages the recipe lacks are left out: "
            + ", ".join(f"{k} ×{n}" for k, n in sorted(others.items()))
        )


SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test"}  # fmt: skip


def _by_split_field(
    records: Records, field: str, where: str, required: bool, problems: list[str]
) -> dict[str, Records] | None:
    """Records grouped by the split their `field` names (train, validation/valid/val/dev,
    test); None when no record has the field and it is not `required`."""
    values = [str(r.get(field, "")).strip().lower() for r in records]
    if not required and not any(values):
        return None
    groups: dict[str, Records] = {}
    bad = Counter()
    for r, v in zip(records, values):
        if v in SPLIT_NAMES:
            groups.setdefault(SPLIT_NAMES[v], []).append(r)
        else:
            bad[v or "(missing)"] += 1
    if bad:
        problems.append(
            f"{where}: split_field {field!r} must say train, validation (or valid, val, dev) or "
            "test in every record; found " + ", ".join(f"{k!r} ×{n}" for k, n in bad.most_common(5))
        )
    return groups


def _prepare_language(
    code: str, raw: dict[str, Records], spec: DataSpec, problems: list[str], warnings: list[str]
) -> LanguageSplits:
    def where(name: str) -> str:
        return f"{code} {'data' if name == 'all' else 'added data' if name == 'more' else name}"

    placed: dict[str, list[Example]] = {}  # added data whose records name their split
    if (field := spec.split_field) is not None:
        if "all" in raw:  # `data:`: the column gives each record's split
            groups = _by_split_field(raw.pop("all"), field, where("all"), True, problems)
            raw.update(groups or {})
        if "more" in raw:
            groups = _by_split_field(raw["more"], field, where("more"), False, problems)
            if groups is not None:
                del raw["more"]
                for name, records in groups.items():
                    placed[name] = _examples(records, spec.task, where("more"), problems)
    splits: dict[str, list[Example]] = {}
    for name, records in raw.items():
        splits[name] = _examples(records, spec.task, where(name), problems)
    known = {_key(e.text) for name, examples in splits.items() if name != "more" for e in examples}
    dropped = 0
    for group in [splits.get("more", []), *placed.values()]:  # added data already there
        kept = [e for e in group if _key(e.text) not in known]
        dropped += len(group) - len(kept)
        group[:] = kept
    if dropped:
        warnings.append(
            f"{code}: {dropped} examples of the added data are already in its data and are left "
            "out (not counted twice)"
        )
    splits = _carve(splits, spec)
    for name, examples in placed.items():
        splits[name] += examples
    d = LanguageSplits(code, splits["train"], splits["validation"], splits["test"])
    if not d.train:
        problems.append(f"{code}: no training examples")
    elif len(d.train) < spec.min_examples:
        problems.append(
            f"{code}: only {len(d.train)} training examples (the recipe's min_examples is "
            f"{spec.min_examples}): add data, or lower min_examples if this is intended"
        )
    for name in ("validation", "test"):
        if not d.split(name) and d.train:
            warnings.append(f"{code}: no {name} examples")
    seen = {_key(e.text) for e in d.train}
    for name in ("validation", "test"):
        leaked = [e.text for e in d.split(name) if _key(e.text) in seen]
        if leaked:
            problems.append(
                f"{code}: {len(leaked)} {name} examples also occur in train (leakage), "
                f"e.g. {leaked[0][:60]!r}: remove them from one of the two"
            )
    return d


def _examples(records: Records, task: Task, where: str, problems: list[str]) -> list[Example]:
    if task.kind == "classification":
        fields = [task.text_field, task.label_field]
    else:
        fields = [*prompt_fields(task.prompt), task.target_field]
    out, bad, huge = [], [], []
    for i, r in enumerate(records, 1):
        missing = [f for f in fields if r.get(f) is None or str(r.get(f)).strip() == ""]
        if missing:
            bad.append((i, missing))
            continue
        long = [f for f in fields if len(str(r[f])) > MAX_CHARS]
        if long:
            huge.append((i, long[0], len(str(r[long[0]]))))
            continue
        if task.kind == "classification":
            out.append(Example(str(r[task.text_field]), str(r[task.label_field])))
        else:
            prompt = task.prompt.format(**{f: r[f] for f in fields[:-1]})
            out.append(Example(prompt, str(r[task.target_field])))
    if bad:
        shown = ", ".join(f"record {i} lacks {'/'.join(m)}" for i, m in bad[:3])
        problems.append(
            f"{where}: {len(bad)} of {len(records)} records miss a required field or have it "
            f"empty ({shown}{', …' if len(bad) > 3 else ''})"
        )
    if huge:
        shown = ", ".join(f"record {i}'s {f} has {n:,} characters" for i, f, n in huge[:3])
        problems.append(
            f"{where}: {len(huge)} records are longer than {MAX_CHARS:,} characters ({shown}); "
            "a model reads only the first max_length tokens: shorten or remove them"
        )
    return out


def _carve(given: dict[str, list[Example]], spec: DataSpec) -> dict[str, list[Example]]:
    """Fill the splits not given from the training data (or from `data:`), by text hash."""
    more = given.pop("more", [])
    pool = given.pop("all", None)
    if pool is None:
        pool = given.get("train", [])
    cuts = []  # (split, upper bound of its hash range)
    bound = 0.0
    for name, fraction in (("test", spec.split.test), ("validation", spec.split.validation)):
        if name not in given:
            bound += fraction
            cuts.append((name, bound))
    out = {name: list(given.get(name, [])) for name in SPLITS}
    out["train"] = []
    for e in pool:
        u = _unit(spec.split.seed, e.text)
        name = next((n for n, upper in cuts if u < upper), "train")
        out[name].append(e)
    full = [
        ("test", spec.split.test),
        ("validation", spec.split.test + spec.split.validation),
    ]
    for e in more:  # added data brings its own share of every split
        u = _unit(spec.split.seed, e.text)
        out[next((n for n, upper in full if u < upper), "train")].append(e)
    return out


def _labels(
    task: Task, data: dict[str, LanguageSplits], problems: list[str], warnings: list[str]
) -> list[str]:
    seen = sorted({e.answer for d in data.values() for s in SPLITS for e in d.split(s)})
    if task.labels is None:
        labels = seen
        if len(labels) < 2:
            problems.append(
                f"the data has {len(labels)} distinct label(s); classification needs 2+"
            )
    else:
        labels = list(task.labels)
        for code, d in data.items():
            for s in SPLITS:
                odd = Counter(e.answer for e in d.split(s) if e.answer not in labels)
                if odd:
                    problems.append(
                        f"{code} {s}: labels outside task.labels: "
                        + ", ".join(f"{k!r} ×{n}" for k, n in odd.most_common(5))
                        + f" (task.labels is {labels})"
                    )
    for code, d in data.items():
        trained = {e.answer for e in d.train}
        if len(trained) == 1 and len(labels) > 1 and task.kind == "classification":
            problems.append(
                f"{code}: every training example has the label {next(iter(trained))!r}, so its "
                "expert could learn only to predict that: add examples of other labels"
            )
        unseen = sorted({e.answer for s in ("validation", "test") for e in d.split(s)} - trained)
        if unseen and d.train:
            warnings.append(f"{code}: labels {unseen} occur in validation/test but not in train")
    return labels


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


def _unit(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{_key(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _hash(items: list[str]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 1) if values else 0.0
