"""pac.net.codec: tensors to header entries and frames and back, and what it refuses."""

from __future__ import annotations

import msgpack
import pytest
import torch

from pac.data.tokenize import TokenizedSet
from pac.errors import PacError
from pac.net import codec, protocol
from pac.net.codec import CodecError
from pac.runtime.peer import _data_from_chunks


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8))


def round_trip(tensors: dict[str, torch.Tensor], **kw) -> dict[str, torch.Tensor]:
    """Through msgpack, as the control plane sends them: entries and frames come back as lists and bytes."""
    entries, frames = codec.encode(tensors, **kw)
    wire = msgpack.unpackb(msgpack.packb({"t": entries, "f": [codec.buffer(f) for f in frames]}))
    return codec.decode(codec.parse_header(wire["t"]), wire["f"], require_crc=kw.get("crc", False))


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        assert (got[name].dtype, got[name].shape) == (w.dtype, w.shape), name
        assert raw_bytes(got[name]) == raw_bytes(w), name


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", list(codec.DTYPES.values()), ids=list(codec.DTYPES))
def test_every_wire_dtype_round_trips_bit_exact(dtype):
    tensors = {"x": sample(dtype), "scalar": sample(dtype, ()), "empty": sample(dtype, (0, 5))}
    assert_bit_exact(round_trip(tensors), tensors)
    assert_bit_exact(round_trip(tensors, crc=True), tensors)


def test_a_dict_of_mixed_tensors_round_trips_in_order_and_stays_writable():
    f32 = torch.randn(2, 3)
    f32[0, 0] = float("nan")  # bit-exact includes NaN payloads
    tensors = {
        "hidden": torch.randn(2, 4, 8).to(torch.bfloat16),
        "half": torch.randn(5).to(torch.float16),
        "f32": f32,
        "q": torch.randint(-128, 127, (4, 4), dtype=torch.int8),
        "ids": torch.randint(-(2**40), 2**40, (2, 7)),
        "mask": torch.rand(9) > 0.5,
        "none": torch.empty(0, dtype=torch.int64),
    }
    got = round_trip(tensors)
    assert_bit_exact(got, tensors)
    got["ids"] += 1  # msgpack hands out read-only bytes: the codec copies them rather than give a read-only tensor
    assert torch.equal(got["ids"], tensors["ids"] + 1)


def test_non_contiguous_input_is_sent_as_its_values():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "strided": base[::2, 1::3], "expanded": torch.ones(3, 1).expand(3, 5)}
    got = round_trip(tensors)
    for name, t in tensors.items():
        assert got[name].shape == t.shape and torch.equal(got[name], t), name


def test_contiguous_cpu_tensors_are_framed_without_a_copy():
    t = torch.randn(64, 32)
    _, (frame,) = codec.encode({"t": t})
    assert frame.data_ptr() == t.data_ptr()
    view = codec.buffer(frame)
    assert view.nbytes == t.numel() * 4 and bytes(view) == raw_bytes(t)
    # A writable, aligned buffer becomes the received tensor in place.
    entries, _ = codec.encode({"t": t})
    buf = bytearray(view)
    (spec,) = codec.parse_header(entries)
    assert codec.decode_frame(spec, buf).data_ptr() == torch.frombuffer(buf, dtype=torch.uint8).data_ptr()


def test_unaligned_frames_and_uint8_tensor_frames_decode():
    t = torch.randn(5, dtype=torch.float64)
    entries, (frame,) = codec.encode({"t": t})
    (spec,) = codec.parse_header(entries)
    unaligned = memoryview(bytearray(b"\0" + raw_bytes(t)))[1:]
    assert torch.equal(codec.decode_frame(spec, unaligned), t)
    assert torch.equal(codec.decode_frame(spec, frame.clone()), t)  # what torch.distributed receives


def _entries(**changes) -> list:
    entry = {"name": "x", "dtype": "float32", "shape": [2], "nbytes": 8, "crc": None, **changes}
    return [list(entry.values())]


@pytest.mark.parametrize(
    ("entries", "frames", "complaint"),
    [
        ({"x": 1}, [], "the tensor list is a dict, not a list"),
        ([["x", "float32", [2], 8]], [b"\0" * 8], "is not [name, dtype, shape, nbytes, crc32]"),
        (_entries(name=3), [b"\0" * 8], "tensor name 3 is not a string"),
        (_entries() + _entries(), [b"\0" * 8] * 2, "tensor name 'x' is not a string or repeats"),
        (_entries(dtype="object"), [b"\0" * 8], "has dtype 'object', not one of"),
        (_entries(dtype="complex64"), [b"\0" * 8], "has dtype 'complex64'"),
        (_entries(shape=[-2]), [b"\0" * 8], "tensor 'x' has shape [-2]"),
        (_entries(shape="2"), [b"\0" * 8], "tensor 'x' has shape '2'"),
        (_entries(shape=[3]), [b"\0" * 8], "declares 8 bytes for float32[3]"),
        (_entries(nbytes=True), [b"\0" * 8], "declares True bytes"),
        (_entries(crc="abc"), [b"\0" * 8], "has checksum 'abc'"),
        (_entries(), [], "0 tensor frames for 1 tensors"),
        (_entries(), [b"\0" * 8, b"\0"], "2 tensor frames for 1 tensors"),
        (_entries(), b"\0" * 8, "the tensor frames are a bytes, not a list"),
        (_entries(), None, "the tensor frames are a NoneType, not a list"),
        (_entries(), [b"\0" * 7], "tensor 'x' has 7 bytes, its header says 8"),
        (_entries(), [b""], "tensor 'x' has 0 bytes, its header says 8"),
        (_entries(), [12345678], "the frame of tensor 'x' is a int, not bytes"),
        (_entries(), ["\0" * 8], "the frame of tensor 'x' is a str, not bytes"),
        (_entries(crc=0), [b"\0" * 8], "tensor 'x' fails its CRC32 check"),
        (_entries(dtype="bool", nbytes=2), [b"\0\2"], "is bool but its frame holds bytes other than 0 and 1"),
    ],
)
def test_garbage_truncated_or_mismatched_frames_are_a_clear_codec_error(entries, frames, complaint):
    with pytest.raises(CodecError) as err:
        codec.decode(codec.parse_header(entries), frames)
    assert complaint in str(err.value)
    assert isinstance(err.value, PacError)


def test_a_required_checksum_must_be_there():
    entries, frames = codec.encode({"x": torch.ones(2)})
    with pytest.raises(CodecError, match="fails its CRC32 check"):
        codec.decode(codec.parse_header(entries), [codec.buffer(f) for f in frames], require_crc=True)
    entries, frames = codec.encode({"x": torch.ones(2)}, crc=True)
    flipped = bytearray(codec.buffer(frames[0]))
    flipped[0] ^= 1
    with pytest.raises(CodecError, match="fails its CRC32 check"):
        codec.decode(codec.parse_header(entries), [flipped], require_crc=True)


def test_a_tensor_frame_must_be_flat_uint8():
    (spec,) = codec.parse_header(_entries())
    with pytest.raises(CodecError, match=r"frame of tensor 'x' is a torch.float32 tensor of shape \[2\]"):
        codec.decode_frame(spec, torch.zeros(2))


@pytest.mark.parametrize(
    ("tensors", "complaint"),
    [
        ({"c": torch.zeros(2, dtype=torch.complex64)}, "torch.complex64 (torch.strided), which pac's wire format"),
        ({"s": torch.eye(2).to_sparse()}, "torch.sparse_coo"),
        ({1: torch.zeros(2)}, "dict of str -> torch.Tensor, got 1: Tensor"),
        ({"n": [1, 2]}, "got 'n': list"),
        ([torch.zeros(2)], "got list"),
    ],
)
def test_what_cannot_be_encoded_says_why(tensors, complaint):
    with pytest.raises(CodecError) as err:
        codec.encode(tensors)
    assert complaint in str(err.value)


def _data_message(part: TokenizedSet) -> dict:
    """A `data` message as the coordinator sends it, after the peer's protocol.decode."""
    entries, frames = codec.encode({name: getattr(part, name) for name in protocol.DATA_TENSORS})
    raw = protocol.encode(
        "data",
        split="train",
        sample_ids=part.sample_ids,
        tensors=entries,
        frames=[codec.buffer(f) for f in frames],
        label_names=part.label_names,
        task="classify",
    )
    return protocol.decode(raw)


def _tokenized(n: int, per_token_labels: bool) -> TokenizedSet:
    ids = torch.randint(0, 1000, (n, 6))
    labels = torch.randint(0, 1000, (n, 6)) if per_token_labels else torch.randint(0, 3, (n,))
    return TokenizedSet([f"s{i}" for i in range(n)], ids, (ids > 100).long(), labels, None)


@pytest.mark.parametrize("per_token_labels", [False, True])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_the_peer_rebuilds_the_coordinators_data_chunks(n, per_token_labels):
    data = _tokenized(n, per_token_labels)
    chunks = [_data_message(data.subset(slice(s, s + 2))) for s in range(0, max(n, 1), 2)]
    got = _data_from_chunks("train", chunks)
    assert got.sample_ids == data.sample_ids and got.label_names is None
    for name in protocol.DATA_TENSORS:
        assert torch.equal(getattr(got, name), getattr(data, name)), name
        assert getattr(got, name).shape == getattr(data, name).shape, name


def test_the_peer_refuses_data_chunks_that_make_no_tokenized_set():
    good = _data_message(_tokenized(2, False))
    truncated = {**good, "frames": [good["frames"][0][:-1], *good["frames"][1:]]}
    with pytest.raises(PacError, match="data chunk 0 of split 'train' is garbage or truncated: tensor 'input_ids'"):
        _data_from_chunks("train", [truncated])
    fewer_ids = {**good, "sample_ids": ["s0"]}
    with pytest.raises(PacError, match=r"holds input_ids torch.int64 \[2, 6\].* for 1 samples; expected int64"):
        _data_from_chunks("train", [fewer_ids])
    entries, frames = codec.encode({"input_ids": torch.zeros(2, 6)})
    floats = {**good, "tensors": entries, "frames": [codec.buffer(f) for f in frames]}
    with pytest.raises(PacError, match="holds input_ids torch.float32"):
        _data_from_chunks("train", [floats])
    wider = _data_message(
        TokenizedSet(["a"], torch.zeros(1, 7).long(), torch.zeros(1, 7).long(), torch.zeros(1).long(), None)
    )
    with pytest.raises(PacError, match="data chunks of split 'train' disagree on the shape of a row"):
        _data_from_chunks("train", [good, wider])
