from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asyncgrad.codec import DEFAULT_MAX_SIZE, Codec, Extension, UnencodableError, decode, encode
from asyncgrad.errors import CodecError

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]


class Point:
    """A tiny user type, as the RPC layer's Tensor and RRef will be."""

    def __init__(self, name: str, xy: np.ndarray[Any, Any]) -> None:
        self.name, self.xy = name, xy

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and self.name == other.name and same(self.xy, other.xy)

    __hash__ = None  # type: ignore[assignment]


POINT = Extension(
    code=16,
    type=Point,
    to_wire=lambda p: (p.name, p.xy),
    from_wire=lambda wire: Point(*wire),
)
CODEC = Codec(extensions=[POINT])


def same(a: Any, b: Any) -> bool:
    """Equal, with exactly the same types all the way down (and NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray | np.generic):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return bool(b != b)
    return bool(a == b)


def via_bytes(value: Any) -> Any:
    return CODEC.decode(CODEC.encode(value))


def via_frames(value: Any) -> Any:
    # bytes(...) stands in for what comes back from separate Redis stream fields.
    return CODEC.decode_frames([bytes(f) for f in CODEC.encode_frames(value)])


@pytest.fixture(params=[via_bytes, via_frames], ids=["bytes", "frames"])
def roundtrip(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    fn: Callable[[Any], Any] = request.param
    return fn


# *** round trips ***


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**64 - 1,
        -(2**63),
        1.5,
        float("nan"),
        float("-inf"),
        "",
        "héllo ✓",
        b"",
        b"\x00\xff",
        [],
        [1, [2, [3]]],
        {},
        {"a": 1, "b": [None, 2.5]},
        {1: "x", (1, (2, "y")): [3], None: b"", 1.5: True, b"k": {}},
        (),
        (1,),
        ((1, 2), [3, (4,)], {"t": (1, {"u": ()})}),
        [(), [()], ((),)],
    ],
)
def test_plain_values_round_trip_with_their_types(
    roundtrip: Callable[[Any], Any], value: Any
) -> None:
    assert same(roundtrip(value), value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 0, 3), (2, 3, 4)])
def test_every_dtype_and_shape_round_trips(
    roundtrip: Callable[[Any], Any], dtype: str, shape: tuple[int, ...]
) -> None:
    arr = (np.arange(int(np.prod(shape))) % 7 - 3).astype(dtype).reshape(shape)
    out = roundtrip(arr)
    assert same(out, arr)
    assert out.flags.c_contiguous


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[::2, 1:],
        lambda a: a[::-1],
        lambda a: np.asfortranarray(a),
        lambda a: a.T,
        lambda a: a.astype(a.dtype.newbyteorder(">")),
        lambda a: np.asfortranarray(a.astype(">c16"))[:, ::2],
        lambda a: np.broadcast_to(a[:1], (5, 4)),
    ],
    ids=["strided", "reversed", "fortran", "transposed", "big-endian", "big-fortran", "stride-0"],
)
def test_unusual_layouts_round_trip_as_little_endian_c_order(
    roundtrip: Callable[[Any], Any], make: Callable[[Any], Any]
) -> None:
    arr = make(np.arange(20, dtype=np.float64).reshape(5, 4) * 1.5)
    out = roundtrip(arr)
    assert np.array_equal(out, arr)
    assert out.shape == arr.shape
    assert out.dtype == arr.dtype.newbyteorder("<")
    assert out.flags.c_contiguous


@pytest.mark.parametrize(
    "scalar",
    [
        np.float32(1.5),
        np.float64(-2.25),
        np.float16(0.5),
        np.int64(3),
        np.int8(-4),
        np.uint64(2**64 - 1),
        np.bool_(True),
        np.complex64(1 - 2j),
        np.complex128(3 + 4j),
    ],
)
def test_numpy_scalars_keep_their_type(roundtrip: Callable[[Any], Any], scalar: np.generic) -> None:
    out = roundtrip([scalar, {"s": scalar}])
    assert type(out[0]) is type(scalar)
    assert out[0] == scalar
    assert type(out[1]["s"]) is type(scalar)


def test_arrays_nested_in_every_container_round_trip(roundtrip: Callable[[Any], Any]) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    value = {
        "args": (a, [a.T, {"k": np.zeros(0, np.int8)}]),
        "kwargs": {"lr": np.float32(0.1), "mask": a > 2},
        (1, 2): (np.array(7, np.uint16),),
    }
    assert same(roundtrip(value), value)


def test_extension_values_round_trip_nested(roundtrip: Callable[[Any], Any]) -> None:
    p = Point("p", np.array([1.0, 2.0], np.float32))
    value = {"p": p, "many": (p, [Point("q", np.zeros((2, 2), np.int16))])}
    out = roundtrip(value)
    assert out["p"] == p
    assert out["many"][0] == p
    assert out["many"][1][0] == Point("q", np.zeros((2, 2), np.int16))
    assert type(out["many"]) is tuple


def test_extension_inside_extension_round_trips() -> None:
    class Pair:
        def __init__(self, a: Any, b: Any) -> None:
            self.a, self.b = a, b

    pair = Extension(17, Pair, lambda p: [p.a, p.b], lambda w: Pair(*w))
    codec = Codec(extensions=[POINT, pair])
    p = Point("in", np.ones(3))
    for out in [
        codec.decode(codec.encode(Pair(p, (p,)))),
        codec.decode_frames(codec.encode_frames(Pair(p, (p,)))),
    ]:
        assert type(out) is Pair
        assert out.a == p
        assert out.b == (p,)


def test_wire_format_of_an_array_is_pinned() -> None:
    head = bytes([0, 2, 1]) + bytes(5) + struct.pack("<Q", 2)  # in-band int16, 1 dim of 2
    in_band = b"\xc7\x14\x00" + head + struct.pack("<2h", 7, -1)
    assert CODEC.encode(np.array([7, -1], ">i2")) == in_band
    body, frame = CODEC.encode_frames(np.array([7, -1], "<i2"))
    assert body == b"\xc7\x14\x00" + bytes([1]) + head[1:] + struct.pack("<I", 1)
    assert bytes(frame) == struct.pack("<2h", 7, -1)
    assert CODEC.encode((np.float32(1.5),)) == (
        b"\x92\xc7\x00\x01\xc7\x0c\x00" + bytes([2, 10, 0]) + bytes(5) + struct.pack("<f", 1.5)
    )


def test_bytearray_and_memoryview_travel_as_bytes_and_decode_accepts_them() -> None:
    assert CODEC.decode(CODEC.encode([bytearray(b"ab"), memoryview(b"cd")])) == [b"ab", b"cd"]
    data = CODEC.encode({"a": np.arange(3)})
    for buffer in (bytearray(data), memoryview(data)):
        assert same(CODEC.decode(buffer), {"a": np.arange(3)})


def test_module_level_functions_use_a_default_codec() -> None:
    assert same(decode(encode({"x": (1, np.float32(2))})), {"x": (1, np.float32(2))})
    with pytest.raises(TypeError, match="'Point'"):
        encode(Point("p", np.ones(1)))


# *** no copies ***


def test_decode_frames_builds_arrays_on_the_frames_without_copying() -> None:
    arr = np.arange(1000, dtype=np.float32)
    frames = [bytes(f) for f in CODEC.encode_frames({"a": arr, "b": [arr[::2]]})]
    assert len(frames) == 3
    out = CODEC.decode_frames(frames)
    for got, frame in [(out["a"], frames[1]), (out["b"][0], frames[2])]:
        assert np.shares_memory(got, np.frombuffer(frame, np.uint8))
        base = got.base
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, memoryview)
        assert base.obj is frame
        assert not got.flags.writeable


def test_decode_in_band_makes_read_only_views() -> None:
    out = CODEC.decode(CODEC.encode([np.arange(100, dtype=np.float64)]))[0]
    assert not out.flags.owndata
    assert not out.flags.writeable
    assert out.ctypes.data % 8 == 0


def test_encode_frames_shares_a_contiguous_little_endian_array() -> None:
    arr = np.arange(12, dtype="<f8").reshape(3, 4)
    _, frame = CODEC.encode_frames(arr)
    assert isinstance(frame, memoryview)
    assert np.shares_memory(np.frombuffer(frame, np.uint8), arr)
    _, swapped = CODEC.encode_frames(arr.astype(">f8"))
    assert bytes(swapped) == arr.tobytes()
    _, fortran = CODEC.encode_frames(np.asfortranarray(arr))
    assert bytes(fortran) == arr.tobytes()


def test_decode_frames_accepts_memoryviews() -> None:
    arr = np.arange(10, dtype=np.int32)
    assert same(CODEC.decode_frames(CODEC.encode_frames((arr, arr))), (arr, arr))


# *** what cannot travel ***


class Color(enum.IntEnum):
    RED = 1


class MyArray(np.ndarray):
    pass


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, {"a": {2}}], r"type 'set' at value\[1\]\['a'\]: allowed types are None, bool"),
        ({"k": (1, object())}, r"type 'object' at value\['k'\]\[1\]"),
        ({frozenset(): 1}, r"type 'frozenset' at value<key frozenset\(\)>"),
        ([Color.RED], r"type 'Color' at value\[0\]"),
        ({"d": {}.keys()}, r"type 'dict_keys' at value\['d'\]"),
        ([np.zeros(2).view(MyArray)], r"type 'MyArray' at value\[0\]"),
        ([np.array([None])], r"array of dtype '\|O' at value\[0\]: allowed: bool, int8"),
        ((np.zeros(1, "M8[s]"),), r"dtype '<M8\[s\]' at value\[0\]"),
        (np.zeros(1, [("a", "i4")]), r"array of dtype .* at value:"),
        (np.zeros(1, "U3"), r"array of dtype '<U3'"),
        ([np.str_("x")], r"numpy scalar of dtype '<U1' at value\[0\]"),
        ([np.zeros(1, np.longdouble)], r"dtype '<f16' at value\[0\]"),
        ([1, 2**64], r"an int out of range \(65 bits\) at value\[1\]: msgpack ints are -2\*\*63"),
        ({"x": -(2**63) - 1}, r"an int out of range \(64 bits\) at value\['x'\]"),
        (Point("p", np.zeros(1, object)), r"dtype '\|O' at value<Point>\[1\]"),
        ([np.zeros([1] * 33)], r"an array of 33 dims at value\[0\]: at most 32"),
    ],
)
def test_unencodable_values_raise_type_error_naming_type_and_path(value: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        CODEC.encode(value)
    with pytest.raises(TypeError, match=message):
        CODEC.encode_frames(value)


async def _pending() -> int:
    return 1


def test_an_awaitable_hints_at_a_missing_await() -> None:
    pending = _pending()
    try:
        with pytest.raises(UnencodableError) as raised:
            CODEC.encode({"x": [pending]})
    finally:
        pending.close()
    assert str(raised.value) == (
        "cannot encode a value of type 'coroutine' at value['x'][0]: "
        "a coroutine is not a value: a missing `await`?"
    )
    # What a caller that wrapped the value needs to place it from the user's value down:
    assert raised.value.steps == (("item", "x"), ("item", 0))
    restated = raised.value.restated("at kwargs['x'][0]")
    assert type(restated) is TypeError
    assert str(restated).startswith("cannot encode a value of type 'coroutine' at kwargs['x'][0]")


def test_type_error_names_registered_extensions_and_rejects_subclasses() -> None:
    class SubPoint(Point):
        pass

    with pytest.raises(TypeError, match=r"type 'SubPoint' at value\[0\]: .*scalars, Point$"):
        CODEC.encode([SubPoint("p", np.ones(1))])


def test_values_nested_too_deep_raise_codec_error() -> None:
    value: list[Any] = []
    for _ in range(1100):
        value = [value]
    with pytest.raises(CodecError, match="cannot encode"):
        CODEC.encode(value)


@pytest.mark.parametrize(
    "ext",
    [
        lambda: Extension(15, Point, repr, repr),
        lambda: Extension(128, Point, repr, repr),
    ],
)
def test_extension_codes_outside_16_to_127_are_refused(ext: Callable[[], Extension]) -> None:
    with pytest.raises(ValueError, match=r"16\.\.127"):
        ext()


@pytest.mark.parametrize(
    "extensions",
    [
        [POINT, Extension(16, Color, repr, repr)],
        [POINT, Extension(20, Point, repr, repr)],
        [Extension(20, tuple, repr, repr)],
        [Extension(20, np.ndarray, repr, repr)],
        [Extension(20, int, repr, repr)],
    ],
)
def test_conflicting_or_builtin_extensions_are_refused(extensions: list[Extension]) -> None:
    with pytest.raises(ValueError, match=r"reuses|encoded by the codec"):
        Codec(extensions=extensions)


# *** size limits ***


def test_encode_over_the_limit_raises_codec_error_with_size_and_limit() -> None:
    codec = Codec(max_size=1000)
    with pytest.raises(CodecError, match="1600 bytes exceed the limit of 1000"):
        codec.encode(np.zeros(200))
    with pytest.raises(CodecError, match=r"encoded size 1\d\d\d bytes exceeds the limit of 1000"):
        codec.encode_frames([np.zeros(100), b"x" * 300])
    with pytest.raises(CodecError, match="exceeds the limit of 1000"):
        codec.encode("x" * 1000)
    assert len(codec.encode(b"x" * 990)) <= 1000


def test_a_huge_array_is_refused_before_any_copy() -> None:
    # 2 GiB of nbytes backed by 8 bytes: copying it would take seconds and the memory.
    huge = np.broadcast_to(np.float64(0), (2**28,))
    assert huge.nbytes > DEFAULT_MAX_SIZE
    with pytest.raises(CodecError, match=f"exceed the limit of {DEFAULT_MAX_SIZE}"):
        CODEC.encode([huge])
    with pytest.raises(CodecError, match="arrays of 1600 bytes exceed the limit of 1000"):
        Codec(max_size=1000).encode_frames((np.zeros(100), np.zeros(100)))


def test_decode_over_the_limit_raises_codec_error() -> None:
    codec = Codec(max_size=100)
    with pytest.raises(CodecError, match="101 bytes exceeds the limit of 100"):
        codec.decode(msgpack.packb(b"x" * 99))
    frames = Codec().encode_frames(np.zeros(20))
    with pytest.raises(CodecError, match="exceeds the limit of 100"):
        codec.decode_frames(frames)


def array_ext(
    flags: int, code: int, shape: tuple[int, ...], tail: bytes = b"", pad: bytes = bytes(5)
) -> bytes:
    head = struct.pack("<BBB", flags, code, len(shape)) + pad
    head += struct.pack(f"<{len(shape)}Q", *shape)
    return bytes(msgpack.packb(msgpack.ExtType(0, head + tail)))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (array_ext(0, 10, (2**40, 2**40), bytes(16)), "needs .* bytes, got 16"),
        (array_ext(0, 11, (2**63, 2**63, 2**63)), "needs .* bytes, got 0"),
        (array_ext(0, 11, (3,), bytes(23)), "needs 24 bytes, got 23"),
        (array_ext(0, 11, (3,), bytes(25)), "needs 24 bytes, got 25"),
        (array_ext(0, 11, (0, 2**64 - 1)), "array of shape"),
        (array_ext(0, 11, (0, 2**62, 2**62)), "array of shape"),
        (array_ext(0, 14, (1,), bytes(8)), "bad array header"),
        (array_ext(4, 11, (1,), bytes(8)), "bad array header"),
        (array_ext(0, 11, (1,), bytes(8), pad=b"\x00\x00\x01\x00\x00"), "bad array header"),
        (array_ext(0, 11, (1,) * 33, bytes(8)), "bad array header"),
        (array_ext(2, 11, (1,), bytes(8)), "bad array header"),
        (array_ext(3, 11, (), struct.pack("<I", 1)), "bad array header"),
        (array_ext(1, 11, (1,), struct.pack("<I", 1)), "bad or reused frame index 1"),
        (array_ext(1, 11, (1,)), "bad array header"),
        (array_ext(0, 11, (1, 1)), "needs 8 bytes, got 0"),
        (bytes(msgpack.packb(msgpack.ExtType(0, bytes([0, 11, 2]) + bytes(13)))), "bad array"),
        (bytes(msgpack.packb(msgpack.ExtType(0, b"\x00\x0b\x00"))), "array header of 3 bytes"),
    ],
)
def test_bad_array_payloads_raise_codec_error(payload: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        CODEC.decode(payload)


def test_bad_frame_references_raise_codec_error() -> None:
    body, frame = (bytes(f) for f in CODEC.encode_frames(np.zeros(2)))
    oob = array_ext(1, 11, (2,), struct.pack("<I", 1))
    assert same(CODEC.decode_frames([oob, frame]), np.zeros(2))
    for frames, message in [
        ([array_ext(1, 11, (2,), struct.pack("<I", 0)), frame], "bad or reused frame index 0"),
        ([array_ext(1, 11, (2,), struct.pack("<I", 2)), frame], "bad or reused frame index 2"),
        ([body, frame, frame], "a frame no array refers to"),
        ([body, frame[:-1]], "needs 16 bytes, got 15"),
        ([body], "bad or reused frame index 1"),
        ([body, "not a buffer"], "not a contiguous buffer"),
        ([body, memoryview(frame)[::2]], "not a contiguous buffer"),
        ([], "no frames"),
    ]:
        with pytest.raises(CodecError, match=message):
            CODEC.decode_frames(frames)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="reused frame index 1"):
        CODEC.decode_frames([b"\x92" + oob + oob, frame, frame])


# *** malformed input ***

TAG = bytes(msgpack.packb(msgpack.ExtType(1, b"")))
POINT_TAG = bytes(msgpack.packb(msgpack.ExtType(16, b"")))
TIMESTAMP = b"\xd6\xff" + bytes(4)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        b"\x01\x02",
        b"\xa2\xff\xfe",
        b"\x81\x91\x01\x02",
        b"\x81" + CODEC.encode(np.zeros(1)) + b"\x01",
        b"\x91" * 2000 + b"\xc0",
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        bytes(msgpack.packb(msgpack.ExtType(2, b""))),
        bytes(msgpack.packb(msgpack.ExtType(99, b"x"))),
        bytes(msgpack.packb(msgpack.ExtType(1, b"x"))),
        TIMESTAMP,
        b"\xc7\x0c\xff" + bytes(12),
        b"\xc7\x03\xff" + bytes(3),
        b"\x92\x01" + TIMESTAMP,
        b"\x81\x01" + TIMESTAMP,
        b"\x81" + TIMESTAMP + b"\x01",
        TAG,
        b"\x92\x01" + TAG,
        b"\x92" + TAG + TAG,
        b"\x81\x01" + TAG,
        b"\x81" + TAG + b"\x01",
        b"\x91" + POINT_TAG,
        b"\x93" + POINT_TAG + b"\x01\x02",
        b"\x92" + POINT_TAG + b"\x01",
        b"\x92" + POINT_TAG + b"\x92\xa1p" + TAG,
    ],
)
def test_malformed_input_raises_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        CODEC.decode(data)


def test_a_tuple_with_a_tag_inside_is_malformed() -> None:
    # A tagged list is a tuple; a second tag inside it must not leak out as a value.
    with pytest.raises(CodecError, match="outside its place"):
        CODEC.decode(b"\x93" + TAG + b"\x01" + TAG)


# *** properties ***

keys = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5)
arrays = hnp.arrays(
    st.sampled_from(DTYPES).map(np.dtype),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
)
leaves = (
    keys
    | st.floats()
    | st.binary(max_size=8)
    | arrays
    | arrays.filter(lambda a: a.ndim == 0).map(lambda a: a[()])
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(keys | st.tuples(keys, keys), inner, max_size=3)
        | st.builds(Point, st.text(max_size=3), arrays)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(values)
def test_any_allowed_value_round_trips(value: Any) -> None:
    for out in (via_bytes(value), via_frames(value)):
        assert same(out, value)


def decodes_or_raises_codec_error(frames: list[bytes]) -> None:
    try:
        if len(frames) > 1:
            CODEC.decode_frames(frames)
        else:
            CODEC.decode(frames[0])
    except CodecError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_codec_error(data: bytes) -> None:
    decodes_or_raises_codec_error([data])


@settings(max_examples=300, deadline=None)
@given(values, st.booleans(), st.data())
def test_damaged_encodings_decode_or_raise_codec_error(
    value: Any, use_frames: bool, data: st.DataObject
) -> None:
    frames = [bytes(f) for f in CODEC.encode_frames(value)] if use_frames else []
    frames = frames or [CODEC.encode(value)]
    which = data.draw(st.integers(0, len(frames) - 1))
    frame = frames[which]
    damage = data.draw(st.sampled_from(["truncate", "flip", "extend"]))
    if damage == "truncate":
        frame = frame[: data.draw(st.integers(0, max(len(frame) - 1, 0)))]
    elif damage == "flip" and frame:
        i = data.draw(st.integers(0, len(frame) - 1))
        frame = frame[:i] + bytes([frame[i] ^ (1 << data.draw(st.integers(0, 7)))]) + frame[i + 1 :]
    else:
        frame += data.draw(st.binary(min_size=1, max_size=8))
    frames[which] = frame
    decodes_or_raises_codec_error(frames)
