"""Activation cache: format, writer (resume, corruption repair), reader, int8 quantisation, fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pac.cache import (
    CacheReader,
    CacheSpec,
    CacheWriter,
    cache_bytes_per_sample,
    cache_dir_for,
    choose_dtype,
    dequantize,
    find_cache,
    fingerprint_files,
    fingerprint_json,
    quantize,
)
from pac.cache.quant import SCHEMES
from pac.errors import CacheCorruptError, CacheError

T, D = 8, 16
TAPS = (0, 1, 2, 3)


def make_spec(**kw) -> CacheSpec:
    base = dict(
        model_fingerprint="m" * 64,
        tokenizer_fingerprint="t" * 64,
        data_fingerprint="d" * 64,
        max_length=T,
        taps=TAPS,
        hidden_size=D,
        dtype="fp16",
    )
    base.update(kw)
    return CacheSpec(**base)


def sample_ids(n: int) -> list[str]:
    return [f"s{i:03d}" for i in range(n)]


def fake_batch(ids: list[str], taps=None, seq_len=T, per_token=True, all_taps=TAPS):
    """Deterministic per-sample data so any subset (of samples and taps) can be regenerated and compared."""
    taps = all_taps if taps is None else taps
    xs, ms, ls = [], [], []
    for sid in ids:
        g = torch.Generator().manual_seed(int(sid[1:]))
        full = torch.randn(len(all_taps), seq_len, D, generator=g) * 3.0
        xs.append(full[[all_taps.index(t) for t in taps]])
        n_real = 3 + int(sid[1:]) % (seq_len - 2)
        ms.append((torch.arange(seq_len) < n_real).long())
        ls.append(torch.randint(0, 100, (seq_len,), generator=g) if per_token else torch.tensor(int(sid[1:]) % 5))
    return torch.stack(xs), torch.stack(ms), torch.stack(ls)


def digests(ids: list[str], version: str = "") -> list[str]:
    """What fake_batch's samples are (their data is a function of the id), as TokenizedSet.sample_digests."""
    return [f"{sid}{version}" for sid in ids]


def build(root, spec, ids, shard_size=4, per_token=True):
    w = CacheWriter(root, spec, ids, shard_size=shard_size, sample_digests=digests(ids))
    for group in w.pending():
        w.write(group, *fake_batch(group, per_token=per_token))
    return w, w.finalize()


# -- spec and key ------------------------------------------------------------------------------------------
def test_key_is_canonical_and_dir_name():
    a = make_spec()
    b = make_spec(taps=list(TAPS))
    assert a == b and a.key() == b.key() and len(a.key()) == 64
    assert a.key() != make_spec(data_fingerprint="x").key()
    assert a.key() != make_spec(dtype="bf16").key()
    assert cache_dir_for(Path("/r"), a) == Path("/r") / a.key()[:16]
    expected = hashlib.sha256(json.dumps(a.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert a.key() == expected
    with pytest.raises(CacheError, match="dtype"):
        make_spec(dtype="fp8")
    with pytest.raises(CacheError, match="ascending"):
        make_spec(taps=(2, 1))


# -- round trips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-3), ("bf16", 8e-3), ("int8", 1.5e-2)])
@pytest.mark.parametrize("per_token", [True, False])
def test_round_trip(tmp_path, dtype, tol, per_token):
    spec = make_spec(dtype=dtype)
    ids = sample_ids(10)
    _, d = build(tmp_path, spec, ids, shard_size=4, per_token=per_token)
    r = CacheReader(d, spec)
    assert len(r) == 10 and r.sample_ids == ids and r.spec == spec
    order = ["s007", "s001", "s002", "s009", "s003"]  # shuffled, across shards
    got = r.load(order)
    x, m, lab = fake_batch(order, per_token=per_token)
    assert got["taps"].dtype == torch.float32 and got["taps"].shape == (5, len(TAPS), T, D)
    err = (got["taps"] - x).norm() / x.norm()
    assert err < tol, f"{dtype}: relative error {err:.2e}"
    assert got["attention_mask"].dtype == torch.long and torch.equal(got["attention_mask"], m)
    assert got["labels"].dtype == torch.long and torch.equal(got["labels"], lab)
    # a second read (handles kept open) gives the same result, so does a pickled copy (DataLoader workers)
    assert torch.equal(r.load(order)["taps"], got["taps"])
    assert torch.equal(pickle.loads(pickle.dumps(r)).load(order)["taps"], got["taps"])


def test_an_empty_share_is_a_complete_empty_cache(tmp_path):
    """A peer's share of a split smaller than the cluster can be empty: its cache holds no samples."""
    spec = make_spec()
    w, d = build(tmp_path, spec, [])
    assert w.pending() == [] and find_cache(tmp_path, spec) == d
    r = CacheReader(d, spec)
    assert len(r) == 0 and r.verify() == []
    assert r.load([])["taps"].shape == (0, len(TAPS), T, D)


def test_load_tap_subset_and_order(tmp_path):
    spec = make_spec()
    ids = sample_ids(6)
    _, d = build(tmp_path, spec, ids, shard_size=4)
    r = CacheReader(d)
    x, _, _ = fake_batch(ids[1:5])
    got = r.load(ids[1:5], taps=(3, 1))
    assert got["taps"].shape == (4, 2, T, D)
    torch.testing.assert_close(got["taps"], x[:, [3, 1]].half().float())
    got = r.load(ids[1:5], taps=(1, 2))
    torch.testing.assert_close(got["taps"], x[:, 1:3].half().float())
    with pytest.raises(CacheError, match="tap 7"):
        r.load(ids[:1], taps=(7,))
    with pytest.raises(CacheError, match="nope"):
        r.load(["nope"])


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_variable_seq_len_is_padded(tmp_path, dtype):
    spec = make_spec(dtype=dtype)
    ids = sample_ids(4)
    w = CacheWriter(tmp_path, spec, ids, shard_size=2)
    w.write(ids[:2], *fake_batch(ids[:2]))
    short = fake_batch(ids[2:], seq_len=5)
    w.write(ids[2:], *short)
    r = CacheReader(w.finalize())
    got = r.load([ids[3], ids[0]])
    assert got["taps"].shape == (2, len(TAPS), T, D)
    tol = {"fp16": 1e-3, "int8": 2e-2}[dtype]
    assert (got["taps"][0, :, :5] - short[0][1]).norm() / short[0][1].norm() < tol
    assert (got["taps"][1] - fake_batch(ids[:1])[0][0]).norm() / got["taps"][1].norm() < tol
    assert got["taps"][0, :, 5:].abs().max() == 0
    assert got["attention_mask"][0, 5:].abs().max() == 0
    assert (got["labels"][0, 5:] == -100).all()
    with pytest.raises(CacheError, match="tokens"):
        w.write(ids[:1], *fake_batch(ids[:1], seq_len=T + 1))


# -- manifest ------------------------------------------------------------------------------------------------
def test_manifest_content(tmp_path):
    spec = make_spec()
    ids = sample_ids(10)
    _, d = build(tmp_path, spec, ids, shard_size=4)
    assert d == tmp_path / spec.key()[:16]
    m = json.loads((d / "manifest.json").read_text())
    assert m["version"] == 1
    assert m["spec"] == {**spec.to_dict(), "taps": list(TAPS)}
    assert m["sample_ids"] == ids and m["num_samples"] == 10
    assert m["complete"] is True and m["created"] and m["updated"]
    assert [s["sample_ids"] for s in m["shards"]] == [ids[0:4], ids[4:8], ids[8:10]]
    for s in m["shards"]:
        f = d / s["file"]
        assert s["taps"] == list(TAPS)
        assert s["bytes"] == f.stat().st_size
        assert s["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert sorted(p.name for p in d.glob("*.safetensors")) == sorted(s["file"] for s in m["shards"])
    assert not list(d.glob("*.tmp"))
    total = sum(s["bytes"] for s in m["shards"])
    assert cache_bytes_per_sample(d) == pytest.approx(total / 10)
    assert cache_bytes_per_sample(d) > len(TAPS) * T * D * 2  # fp16 payload


# -- resume --------------------------------------------------------------------------------------------------
def test_resume_pending_only_returns_the_rest(tmp_path):
    spec = make_spec()
    ids = sample_ids(10)
    w = CacheWriter(tmp_path, spec, ids, shard_size=3)
    groups = w.pending()
    assert groups == [ids[0:3], ids[3:6], ids[6:9], ids[9:10]]
    for g in groups[:2]:
        w.write(g, *fake_batch(g))
    with pytest.raises(CacheError, match="still miss taps"):
        w.finalize()
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(cache_dir_for(tmp_path, spec))
    assert find_cache(tmp_path, spec) is None
    w2 = CacheWriter(tmp_path, spec, ids, shard_size=3)  # e.g. after a kill
    rest = w2.pending()
    assert rest == [ids[6:9], ids[9:10]]
    for g in rest:
        w2.write(g, *fake_batch(g))
    assert w2.pending() == []
    d = w2.finalize()
    assert find_cache(tmp_path, spec) == d
    x, _, _ = fake_batch(ids)
    torch.testing.assert_close(CacheReader(d, spec).load(ids)["taps"], x.half().float())


def test_write_splits_into_shards(tmp_path):
    spec = make_spec()
    ids = sample_ids(10)
    w = CacheWriter(tmp_path, spec, ids, shard_size=4)
    w.write(ids, *fake_batch(ids))
    m = json.loads((w.finalize() / "manifest.json").read_text())
    assert [len(s["sample_ids"]) for s in m["shards"]] == [4, 4, 2]


def test_rewriting_written_samples_is_refused(tmp_path):
    spec = make_spec()
    ids = sample_ids(4)
    w = CacheWriter(tmp_path, spec, ids, shard_size=4)
    w.write(ids[:2], *fake_batch(ids[:2]))
    with pytest.raises(CacheError, match="pending"):
        w.write(ids[1:3], *fake_batch(ids[1:3]))
    assert not list(cache_dir_for(tmp_path, spec).glob("*.tmp"))
    with pytest.raises(CacheError, match="not in this cache"):
        w.write(["zzz"], *fake_batch(ids[:1]))


def test_same_spec_different_samples_is_an_error(tmp_path):
    spec = make_spec()
    CacheWriter(tmp_path, spec, sample_ids(4))
    with pytest.raises(CacheError, match="different list of samples"):
        CacheWriter(tmp_path, spec, sample_ids(5))


def test_leftovers_of_a_killed_writer_are_removed(tmp_path, caplog):
    spec = make_spec()
    ids = sample_ids(4)
    w = CacheWriter(tmp_path, spec, ids, shard_size=2)
    w.write(ids[:2], *fake_batch(ids[:2]))
    d = cache_dir_for(tmp_path, spec)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_tmp = d / f".x.safetensors.{dead.pid}.abc123.tmp"
    stale_tmp.write_bytes(b"partial")
    orphan = d / "taps000-003_0000002_deadbeef.safetensors"  # renamed but never recorded
    orphan.write_bytes(b"orphan")
    with caplog.at_level(logging.WARNING, logger="pac.cache"):
        assert CacheWriter(tmp_path, spec, ids, shard_size=2).pending() == [ids[2:]]
    assert not stale_tmp.exists() and not orphan.exists()
    assert "interrupted" in caplog.text


# -- corruption ----------------------------------------------------------------------------------------------
def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x01  # in the tensor payload: the file still parses, only the checksum can tell
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_corrupt_shard_detected_and_rebuilt(tmp_path, caplog, damage):
    spec = make_spec()
    ids = sample_ids(8)
    _, d = build(tmp_path, spec, ids, shard_size=4)
    m = json.loads((d / "manifest.json").read_text())
    bad = m["shards"][1]
    bad_path = d / bad["file"]
    damage(bad_path)

    r = CacheReader(d, spec)
    r.load(ids[:4])  # the intact shard still reads
    with pytest.raises(CacheCorruptError, match="(?i)run the cache build again") as ei:
        r.load([ids[5]])
    assert ei.value.shard == str(bad_path) and bad["file"] in str(ei.value)
    assert r.verify() == [str(bad_path)]

    w = CacheWriter(tmp_path, spec, ids, shard_size=4)
    with caplog.at_level(logging.WARNING, logger="pac.cache"):
        todo = w.pending()
    assert todo == [bad["sample_ids"]]
    assert bad["file"] in caplog.text and not bad_path.exists()
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(d)
    for g in todo:
        w.write(g, *fake_batch(g))
    w.finalize()
    r2 = CacheReader(d, spec)
    assert r2.verify() == []
    x, _, _ = fake_batch(ids)
    torch.testing.assert_close(r2.load(ids)["taps"], x.half().float())


def test_missing_shard_file(tmp_path):
    spec = make_spec()
    ids = sample_ids(4)
    _, d = build(tmp_path, spec, ids, shard_size=2)
    f = d / json.loads((d / "manifest.json").read_text())["shards"][0]["file"]
    f.unlink()
    with pytest.raises(CacheCorruptError, match="missing"):
        CacheReader(d).load(ids[:1])
    assert CacheWriter(tmp_path, spec, ids, shard_size=2).pending() == [ids[:2]]


def test_manifest_not_json(tmp_path):
    spec = make_spec()
    _, d = build(tmp_path, spec, sample_ids(4))
    (d / "manifest.json").write_text('{"version": 1, "spec": ')
    with pytest.raises(CacheError, match="delete") as ei:
        CacheReader(d)
    assert str(d) in str(ei.value)
    with pytest.raises(CacheError, match="delete"):
        CacheWriter(tmp_path, spec, sample_ids(4))
    assert find_cache(tmp_path, spec) is None
    with pytest.raises(CacheError, match="no activation cache"):
        CacheReader(tmp_path / "nothing")


# -- specs ---------------------------------------------------------------------------------------------------
def test_different_spec_is_a_different_dir(tmp_path):
    spec = make_spec()
    other = make_spec(data_fingerprint="e" * 64)
    ids = sample_ids(4)
    _, d = build(tmp_path, spec, ids)
    assert find_cache(tmp_path, other) is None
    w = CacheWriter(tmp_path, other, ids)
    assert w.cache_dir != d and w.pending() == [ids]  # nothing reused
    with pytest.raises(CacheError, match="data_fingerprint") as ei:
        CacheReader(d, other)
    assert "training data changed" in str(ei.value)
    with pytest.raises(CacheError, match="max_length.*taps|taps.*max_length"):
        CacheReader(d, make_spec(max_length=T + 1, taps=(0, 1)))


# -- tap blocks ----------------------------------------------------------------------------------------------
def test_tap_blocks_written_separately_are_assembled(tmp_path):
    all_taps = (0, 2, 4, 6, 8)
    spec = make_spec(taps=all_taps)
    ids = sample_ids(6)
    lo, hi = (0, 2), (4, 6, 8)
    w = CacheWriter(tmp_path, spec, ids, shard_size=4)
    for g in w.pending(lo):
        w.write(g, *fake_batch(g, taps=lo, all_taps=all_taps), tap_block=lo)
    assert w.pending(lo) == [] and w.pending(hi) == [ids[:4], ids[4:]]
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(cache_dir_for(tmp_path, spec))
    w2 = CacheWriter(tmp_path, spec, ids, shard_size=3)  # e.g. the other pipeline stage, other shard size
    for g in w2.pending(hi):
        w2.write(g, *fake_batch(g, taps=hi, all_taps=all_taps), tap_block=hi)
    assert w2.pending() == []
    r = CacheReader(w2.finalize(), spec)
    order = ["s005", "s000", "s003", "s004"]
    x, m, lab = fake_batch(order, all_taps=all_taps)
    got = r.load(order)
    torch.testing.assert_close(got["taps"], x.half().float())
    assert torch.equal(got["attention_mask"], m) and torch.equal(got["labels"], lab)
    torch.testing.assert_close(r.load(order, taps=(8, 2, 4))["taps"], x[:, [4, 1, 2]].half().float())
    torch.testing.assert_close(r.load(order, taps=(2, 4))["taps"], x[:, [1, 2]].half().float())
    with pytest.raises(CacheError, match="contiguous"):
        w2.pending((0, 4))
    with pytest.raises(CacheError, match="pending"):  # block already written
        w2.write(ids[:1], *fake_batch(ids[:1], taps=lo, all_taps=all_taps), tap_block=lo)


# -- dtypes --------------------------------------------------------------------------------------------------
def test_fp16_overflow_raises_with_advice(tmp_path):
    ids = sample_ids(2)
    x, m, lab = fake_batch(ids)
    x[1, 2, 3, 4] = 70000.0
    w = CacheWriter(tmp_path, make_spec(), ids)
    with pytest.raises(CacheError, match="bf16") as ei:
        w.write(ids, x, m, lab)
    assert "65504" in str(ei.value) and "tap 2" in str(ei.value)
    assert w.pending() == [ids]
    wb = CacheWriter(tmp_path, make_spec(dtype="bf16"), ids)
    wb.write(ids, x, m, lab)
    got = CacheReader(wb.finalize()).load(ids)["taps"]
    assert got[1, 2, 3, 4] == pytest.approx(70000.0, rel=1e-2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(CacheError, match="non-finite"):
        CacheWriter(tmp_path, make_spec(dtype="int8"), ids).write(ids, x, m, lab)


def test_choose_dtype():
    assert choose_dtype(100.0, "fp16") == "fp16"
    assert choose_dtype(30000.0, "fp16") == "fp16"
    assert choose_dtype(70000.0, "fp16") == "bf16"
    assert choose_dtype(60000.0, "fp16") == "bf16"  # headroom for batches not seen yet
    assert choose_dtype(60000.0, "fp16", headroom=1.0) == "fp16"
    assert choose_dtype(1e6, "bf16") == "bf16"
    assert choose_dtype(1e6, "int8") == "int8"
    with pytest.raises(CacheError, match="non-finite"):
        choose_dtype(float("inf"), "fp16")
    with pytest.raises(CacheError, match="unknown"):
        choose_dtype(1.0, "fp32")


# -- int8 schemes --------------------------------------------------------------------------------------------
def _llm_like(n=4, t=32, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, t, d, generator=g)
    x[..., 5] *= 60.0  # persistent outlier channels
    x[..., 17] *= 25.0
    x[:, :, 0, 9] = 3000.0  # a massive activation on the first token
    return x


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_round_trip(scheme):
    x = _llm_like()
    q = quantize(x, scheme)
    assert q["q"].dtype == torch.int8 and q["q"].shape == x.shape
    y = dequantize(q)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((x - y).norm() / x.norm()) < 0.05
    out = torch.empty_like(x)
    assert dequantize(q, out=out) is out and torch.equal(out, y)


def test_outlier_aware_schemes_beat_plain_absmax():
    x = _llm_like()

    def err(s):
        return float((x - dequantize(quantize(x, s))).norm(dim=-1).div(x.norm(dim=-1)).mean())

    assert err("per_token_topk") < err("per_token") / 3
    assert err("per_token_outlier") < err("per_token") / 3
    with pytest.raises(ValueError, match="scheme"):
        quantize(x, "per_tensor")


# -- fingerprints --------------------------------------------------------------------------------------------
def test_fingerprint_files_memoised(tmp_path):
    side = tmp_path / "memo.json"
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"model weights")
    b.write_bytes(b"tokenizer")
    fp = fingerprint_files([a, b], sidecar=side)
    assert fp == fingerprint_files([b, a], sidecar=side)  # order independent
    memo = json.loads(side.read_text())
    assert memo[str(a.resolve())]["sha256"] == hashlib.sha256(b"model weights").hexdigest()
    # the memo is trusted while (path, size, mtime_ns) are unchanged: proves the file is not re-read
    memo[str(a.resolve())]["sha256"] = "0" * 64
    side.write_text(json.dumps(memo))
    assert fingerprint_files([a, b], sidecar=side) != fp
    a.write_bytes(b"model weightz")  # same size, new mtime -> re-hashed
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    fp2 = fingerprint_files([a, b], sidecar=side)
    assert fp2 != fp and json.loads(side.read_text())[str(a.resolve())]["sha256"] != "0" * 64
    side.write_text("garbage")  # an unreadable memo is ignored
    assert fingerprint_files([a, b], sidecar=side) == fp2
    with pytest.raises(CacheError, match="no such file"):
        fingerprint_files([tmp_path / "missing"], sidecar=side)


def test_fingerprint_dir_and_json(tmp_path):
    side = tmp_path / "memo.json"
    d1, d2 = tmp_path / "m1", tmp_path / "m2"
    for d in (d1, d2):
        (d / "sub").mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "sub" / "w.bin").write_bytes(b"w")
    assert fingerprint_files([d1], sidecar=side) == fingerprint_files([d2], sidecar=side)  # location-free
    (d2 / "sub" / "w.bin").write_bytes(b"v")
    assert fingerprint_files([d1], sidecar=side) != fingerprint_files([d2], sidecar=side)
    assert fingerprint_json({"a": 1, "b": (1, 2)}) == fingerprint_json({"b": [1, 2], "a": 1})
    assert fingerprint_json({"a": 1}) != fingerprint_json({"a": 2})


def test_a_cache_of_a_larger_subset_adopts_the_verified_shards_of_a_smaller_one(tmp_path):
    """A re-planned owner's new share holds its old one: the old cache's shards come in whole (linked, byte for
    byte), only the new samples are pending, a damaged shard there is not trusted, and another model's cache
    is never adopted from."""
    root = tmp_path / "root"
    old_ids = sample_ids(12)[::2]  # s000, s002, ... : the samples owned before
    build(root, make_spec(data_fingerprint="a" * 64), old_ids)
    _, other_model = build(root, make_spec(model_fingerprint="x" * 64, data_fingerprint="b" * 64), sample_ids(12))
    damaged = CacheReader(cache_dir_for(root, make_spec(data_fingerprint="a" * 64)))._entries[-1]
    shard = cache_dir_for(root, make_spec(data_fingerprint="a" * 64)) / damaged["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # its last shard (s008, s010) damaged, its size unchanged
    shard.write_bytes(bytes(data))
    ids = sample_ids(12)
    writer = CacheWriter(root, make_spec(data_fingerprint="c" * 64), ids, shard_size=4, sample_digests=digests(ids))
    assert writer.adopt() == 4  # s000-s006; the damaged shard's two samples are computed again
    pending = [sid for group in writer.pending() for sid in group]
    assert pending == [sid for sid in ids if sid not in ("s000", "s002", "s004", "s006")]
    for group in writer.pending():
        writer.write(group, *fake_batch(group))
    reader = CacheReader(writer.finalize())
    taps, mask, labels = fake_batch(ids)
    got = reader.load(ids)
    torch.testing.assert_close(got["taps"], taps.half().float())
    assert torch.equal(got["labels"], labels)
    assert not reader.verify()
    assert writer.adopt() == 0  # nothing left to adopt: adopting twice changes nothing


def test_adopted_shards_cut_along_other_stages_leave_only_the_taps_they_lack_to_write(tmp_path):
    """After a re-plan the stages, and so the tap blocks, change: a sample whose taps 0-1 came in from an earlier
    cache is pending for the block 0-3, and writing that block stores only its taps 2-3; the result reads back
    whole, and taps this cache wrote itself are still never written twice."""
    root = tmp_path / "root"
    old_ids = sample_ids(8)[::2]
    earlier = CacheWriter(
        root, make_spec(data_fingerprint="a" * 64), old_ids, shard_size=4, sample_digests=digests(old_ids)
    )
    earlier.write(old_ids, *fake_batch(old_ids, taps=(0, 1)), tap_block=(0, 1))  # its first stage's taps only
    ids = sample_ids(8)
    writer = CacheWriter(root, make_spec(data_fingerprint="b" * 64), ids, shard_size=4, sample_digests=digests(ids))
    assert writer.adopt() == 4
    assert [sid for group in writer.pending() for sid in group] == ids  # every sample lacks some of 0-3
    writer.write(ids, *fake_batch(ids))
    reader = CacheReader(writer.finalize())
    manifest = json.loads((reader.cache_dir / "manifest.json").read_text())
    blocks = sorted((tuple(s["taps"]), len(s["sample_ids"])) for s in manifest["shards"])
    assert blocks == [((0, 1), 4), ((0, 1, 2, 3), 4), ((2, 3), 4)]
    taps, _, labels = fake_batch(ids)
    got = reader.load(ids)
    torch.testing.assert_close(got["taps"], taps.half().float())
    assert torch.equal(got["labels"], labels)
    with pytest.raises(CacheError, match="pending"):
        writer.write(ids[:1], *fake_batch(ids[:1]))


def test_a_cache_of_more_layers_adopts_the_shards_of_a_stage_that_held_fewer(tmp_path):
    """A side-pipeline stage whose layer range grew after a re-plan: its new cache takes in the old one's shards
    (taps 1-2 of every sample) and is left to write the taps they do not hold; a cache with a tap the new one
    does not have is left alone."""
    root = tmp_path / "root"
    ids = sample_ids(8)
    old = CacheWriter(root, make_spec(taps=(1, 2)), ids, shard_size=4, sample_digests=digests(ids))
    for group in old.pending():
        old.write(group, *fake_batch(group, taps=(1, 2), all_taps=(1, 2)))
    wider = CacheWriter(root, make_spec(taps=(0, 1, 2, 3, 4)), ids, shard_size=4, sample_digests=digests(ids))
    other = CacheWriter(
        root, make_spec(taps=(5,)), ids, shard_size=4, sample_digests=digests(ids)
    )  # another stage's, of a tap not wanted
    other.write(ids, *fake_batch(ids, taps=(5,), all_taps=(5,)))
    assert wider.adopt() == 8
    writer = CacheWriter(
        root, make_spec(), ids, shard_size=4, sample_digests=digests(ids)
    )  # taps 0-3: holds 1-2, so adopts them too
    assert writer.adopt() == 8
    for group in writer.pending():
        writer.write(group, *fake_batch(group))
    got = CacheReader(writer.finalize()).load(ids)
    torch.testing.assert_close(got["taps"][:, 1:3], fake_batch(ids, taps=(1, 2), all_taps=(1, 2))[0].half().float())


def test_a_cache_of_fewer_layers_or_samples_copies_what_it_wants_out_of_larger_shards(tmp_path):
    """A side-pipeline stage whose layer range shrank after a re-plan, and an owner whose share shrank: their new
    caches take the taps and samples they want out of the old caches' shards (which hold more), read back the
    values those held, and leave nothing pending; a copy is never made twice."""
    root = tmp_path / "root"
    ids = sample_ids(12)
    spec = make_spec(taps=(0, 1, 2, 3, 4), data_fingerprint="a" * 64)
    old = CacheWriter(root, spec, ids, shard_size=4, sample_digests=digests(ids))
    for group in old.pending():
        old.write(group, *fake_batch(group, all_taps=(0, 1, 2, 3, 4)))
    old.finalize()
    spec = make_spec(taps=(1, 2), data_fingerprint="b" * 64)
    narrower = CacheWriter(root, spec, ids[:6], shard_size=4, sample_digests=digests(ids[:6]))
    assert narrower.adopt() == 6
    assert narrower.pending() == []
    got = CacheReader(narrower.finalize()).load(ids[:6])
    expected, mask, labels = fake_batch(ids[:6], taps=(1, 2), all_taps=(0, 1, 2, 3, 4))
    torch.testing.assert_close(got["taps"], expected.half().float())
    assert torch.equal(got["labels"], labels) and torch.equal(got["attention_mask"], mask)
    assert narrower.adopt() == 0


def test_a_sample_whose_content_changed_or_whose_labels_differ_is_never_adopted(tmp_path):
    """Sample ids name rows of a file: an edited file (or the same rows labelled for another task) keeps its ids
    but not its content, and a cache adopts a sample only where the digests of what the model sees agree; a
    cache without digests (from before them) is not adopted from at all."""
    root = tmp_path / "root"
    ids = sample_ids(8)
    old = CacheWriter(root, make_spec(data_fingerprint="a" * 64), ids, shard_size=4, sample_digests=digests(ids))
    old.write(ids, *fake_batch(ids))
    old.finalize()
    edited = digests(ids[:4]) + digests(ids[4:], version="-edited")  # rows 4-7 of the file changed since
    writer = CacheWriter(root, make_spec(data_fingerprint="b" * 64), ids, shard_size=4, sample_digests=edited)
    assert writer.adopt() == 4
    assert [sid for group in writer.pending() for sid in group] == ids[4:]
    blind = CacheWriter(root, make_spec(data_fingerprint="c" * 64), ids, shard_size=4)  # knows no digests
    assert blind.adopt() == 0
    with pytest.raises(CacheError, match="one per sample"):
        CacheWriter(root, make_spec(data_fingerprint="d" * 64), ids, sample_digests=digests(ids[:3]))
