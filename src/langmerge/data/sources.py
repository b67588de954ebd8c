"""Reading examples from where a recipe says they are: JSONL, CSV/TSV, Parquet, a directory
written by `datasets.save_to_disk`, or a data set on the hub.

Each reader returns plain dictionaries, one per example, in file order. Errors name the file
and, where there is one, the line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from langmerge.data.spec import HubData
from langmerge.errors import InputError
from langmerge.models.hub import offline, require_hub
from langmerge.textfile import read_text

Records = list[dict]
SUFFIXES = ".jsonl, .json (one object per line), .csv, .tsv, .parquet"


def read_file(path: Path) -> Records | dict[str, Records]:
    """Examples of one file; a saved `DatasetDict` directory gives its splits by name."""
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _read_parquet(path)
    raise InputError(f"{path}: cannot read {suffix or 'files without a suffix'}; use {SUFFIXES}")


def read_hub(hub: HubData) -> dict[str, Records]:
    """The splits a recipe names of a hub data set (downloaded, or from the local cache)."""
    datasets = _datasets()
    if not offline():  # offline, the datasets library reads its cache or fails at once
        require_hub(f"the data set {hub.id}")
    out = {}
    for ours, theirs in hub.splits.items():
        try:
            ds = datasets.load_dataset(hub.id, hub.config, split=theirs)
        except Exception as e:  # the datasets library raises many kinds; all mean "not readable"
            raise InputError(f"cannot load split {theirs!r} of {hub.id} ({hub.config}): {e}") from e
        out[ours] = ds.to_list()
    return out


def _read_jsonl(path: Path) -> Records:
    records = []
    for number, line in enumerate(read_text(path, "data file").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: each line must be a JSON object")
        records.append(record)
    return records


def _read_csv(path: Path, delimiter: str) -> Records:
    text = io.StringIO(read_text(path, "data file"), newline="")
    reader = csv.DictReader(text, delimiter=delimiter)
    if not reader.fieldnames:
        raise InputError(f"{path}: empty, or no header row naming the columns")
    records = []
    for record in reader:
        if None in record:  # more cells than header columns
            raise InputError(f"{path}:{reader.line_num}: more cells than the header names")
        records.append(record)
    return records


def _read_parquet(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors for a damaged file vary
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None


def _read_saved_dataset(path: Path) -> Records | dict[str, Records]:
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError, arrow errors, …
        raise InputError(
            f"{path} is a directory but not one written by datasets' save_to_disk ({e})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        return {name: split.to_list() for name, split in ds.items()}
    return ds.to_list()


def _datasets():
    try:
        import datasets
    except ImportError:
        raise InputError(
            "reading Hugging Face data sets needs the `datasets` package: "
            "pip install 'langmerge[hf]'"
        ) from None
    return datasets
