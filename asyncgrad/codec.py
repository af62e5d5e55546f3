"""msgpack encoding of the values that travel between workers.

Allowed: None, bool, int (64-bit), float, str, bytes, list, tuple, dict (any of these as
keys), numeric and bool numpy arrays and scalars, and the types of registered
`Extension`s, nested. Anything else raises `UnencodableError` (a `TypeError`) naming the
type and where it sits, with the path as `steps` for a caller that wrapped the value
(except bytearray and memoryview, which msgpack packs before any hook: they arrive as bytes).
Malformed bytes raise `CodecError`, and nothing else. Decoded arrays are read-only views.

Wire format: plain msgpack (bytes as bin) plus the ext codes 0..15 that the codec owns.

- ext 0, an array or numpy scalar: ``flags u8 | dtype u8 | ndim u8 | 5 zero bytes |
  ndim x dim u64`` (little-endian; 8 + 8*ndim bytes, so what follows is 8-byte aligned),
  then the C-order little-endian data (in-band), or with flag 1 (out-of-band) a u32 index
  into the frames of `Codec.encode_frames`. Flag 2 marks a numpy scalar (ndim 0, in-band).
  The dtype code is the position in `_DTYPES`.
- ext 1 with no payload is a tag: the msgpack array ``[tag, *items]`` is a tuple.
- ext ``code`` (16..127) with no payload tags an extension value: ``[tag, to_wire(value)]``.

Tagging msgpack arrays, rather than nesting packed bytes in ext payloads, keeps encoding
one pass: no copy of nested numpy arrays, and no Python recursion.
"""

from __future__ import annotations

import inspect
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import msgpack
import numpy as np

from asyncgrad.errors import CodecError

__all__ = ["DEFAULT_MAX_SIZE", "Codec", "Extension", "UnencodableError", "decode", "encode"]

DEFAULT_MAX_SIZE: Final = 512 * 1024 * 1024

_ARRAY: Final = 0
_TUPLE: Final = 1
_OUT_OF_BAND: Final = 1
_SCALAR: Final = 2
_MAX_NDIM: Final = 32
_PAD: Final = bytes(5)
# _HEADS[ndim] packs flags, dtype code, ndim, padding and dims.
_HEADS: Final = tuple(struct.Struct(f"<BBB5s{n}Q") for n in range(_MAX_NDIM + 1))
_FRAME: Final = struct.Struct("<I")
# NOTE: a dtype's position here is its wire code: append only, never reorder.
_DTYPE_NAMES: Final = (
    "bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, "
    "float16, float32, float64, complex64, complex128"
)
_DTYPES: Final = tuple(np.dtype(name).newbyteorder("<") for name in _DTYPE_NAMES.split(", "))
_DTYPE_CODES: Final = {dt: code for code, dt in enumerate(_DTYPES)}
# msgpack decodes ext -1 to this without asking ext_hook.
_TIMESTAMP: Final = msgpack.Timestamp
_INT_RANGE: Final = range(-(2**63), 2**64)
# Types msgpack packs itself, before the `default` hook could see them.
_NATIVE: Final = frozenset({type(None), bool, int, float, str, bytes, bytearray, memoryview})
_ALLOWED: Final = (
    "allowed types are None, bool, int, float, str, bytes, list, tuple, dict, numeric and bool"
    " numpy arrays and scalars"
)
# msgpack's Packer nests containers this deep. NOTE: its Unpacker stops one level short
# of that, so a value nested exactly 1025 deep encodes but fails to decode (CodecError).
_PACK_DEPTH: Final = 1024


@dataclass(frozen=True)
class Extension:
    """Values of exactly ``type`` travel as ``to_wire(value)``, rebuilt by ``from_wire``.

    ``to_wire`` may return anything the codec encodes (arrays, tuples, other extension
    values); ``code`` is the msgpack ext code, 16..127. Subclasses need their own entry.
    """

    code: int
    type: type[Any]
    to_wire: Callable[[Any], Any]
    from_wire: Callable[[Any], Any]

    def __post_init__(self) -> None:
        if not 16 <= self.code <= 127:
            raise ValueError(f"extension code {self.code} is not in 16..127 (0..15 are reserved)")


class _Tag(NamedTuple):
    """What a tag decodes to, until its list's hook turns the list into a tuple or value."""

    wire: msgpack.ExtType
    ext: Extension | None


_TUPLE_TAG: Final = _Tag(msgpack.ExtType(_TUPLE, b""), None)


class _Unencodable(Exception):
    """``(what, rule)`` from the pack hook; `Codec` makes it an `UnencodableError`."""


# One step down into a value: ("item", index or dict key), ("key", a dict key itself),
# ("ext", the extension type's name: into what its to_wire made).
Step = tuple[str, Any]


def path_text(steps: Sequence[Step]) -> str:
    """`steps` as Python-like subscripts: ``[0]['layers']<key 1><Point>``."""
    return "".join(
        f"[{key!r}]" if kind == "item" else f"<key {key!r}>" if kind == "key" else f"<{key}>"
        for kind, key in steps
    )


class UnencodableError(TypeError):
    """A value that cannot travel: `what` it is, the `steps` from the encoded value down to
    it, and the `rule` it breaks. A caller that wrapped the user's value in a message of
    its own words the place with `restated`, from the user's value down."""

    def __init__(self, what: str, steps: Sequence[Step], rule: str) -> None:
        self.what, self.steps, self.rule = what, tuple(steps), rule
        super().__init__(f"cannot encode {what} at value{path_text(steps)}: {rule}")

    def restated(self, where: str, rule: str | None = None) -> TypeError:
        """The builtin TypeError users get: placed by `where` ("at args[0]['w']"), with
        `rule` if given."""
        return TypeError(f"cannot encode {self.what} {where}: {rule or self.rule}")


class Codec:
    """Encodes values to msgpack and back; ``max_size`` bounds both directions.

    Decoded arrays are read-only views of the received bytes, not copies: ``.copy()`` one
    to write to it.
    """

    def __init__(
        self, *, max_size: int = DEFAULT_MAX_SIZE, extensions: Sequence[Extension] = ()
    ) -> None:
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, not {max_size}")
        self.max_size = max_size
        self._by_type: dict[type[Any], _Tag] = {}
        self._by_code: dict[int, _Tag] = {_TUPLE: _TUPLE_TAG}
        for ext in extensions:
            if ext.code in self._by_code or ext.type in self._by_type:
                raise ValueError(f"extension {ext} reuses a code or a type")
            if ext.type in _NATIVE or ext.type in (tuple, list, dict, np.ndarray):
                raise ValueError(f"{ext.type.__name__} is encoded by the codec itself")
            tag = self._by_code[ext.code] = _Tag(msgpack.ExtType(ext.code, b""), ext)
            self._by_type[ext.type] = tag
        self._allowed = ", ".join([_ALLOWED, *(t.__name__ for t in self._by_type)])

    def encode(self, value: Any) -> bytes:
        """The msgpack bytes of ``value``, arrays included."""
        return self._pack(value, None)

    def encode_frames(self, value: Any) -> list[bytes | memoryview]:
        """``[body, *buffers]``: the body refers to each array's raw buffer by frame index.

        A C-contiguous little-endian array's frame is a view of its memory, not a copy, so
        the array must not change until the frames have been sent.
        """
        frames: list[bytes | memoryview] = [b""]
        frames[0] = self._pack(value, frames)
        return frames

    def encode_plain(self, value: Any) -> bytes:
        """msgpack of a small value of only None, bool, int, float, str, bytes, list, dict:
        no arrays, tuples or extensions, so none of the hooks (message headers use this)."""
        try:
            body: bytes = msgpack.packb(value, use_bin_type=True, strict_types=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"not a plain value: {e}") from None
        if len(body) > self.max_size:
            raise CodecError(f"encoded size {len(body)} bytes exceeds the limit of {self.max_size}")
        return body

    def decode_plain(self, data: bytes | memoryview) -> Any:
        """The value `encode_plain` made; any ext is malformed. The caller checks the types
        it expects (msgpack itself turns ext -1 into a `msgpack.Timestamp`)."""
        if len(data) > self.max_size:
            raise CodecError(f"message of {len(data)} bytes exceeds the limit of {self.max_size}")
        try:
            return msgpack.unpackb(data, ext_hook=_no_ext, strict_map_key=False, timestamp=0)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise CodecError(f"malformed message: {type(e).__name__}: {e}") from e

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """The value ``encode`` made ``data`` from; arrays are read-only views of ``data``."""
        return self._unpack(data if type(data) is bytes else _flat(data), [])

    def decode_frames(self, frames: Sequence[bytes | memoryview]) -> Any:
        """The value ``encode_frames`` made; arrays are views of the frames (read-only if bytes)."""
        if not frames:
            raise CodecError("no frames to decode")
        views = [_flat(frame) for frame in frames]
        return self._unpack(views[0], views)

    def _pack(self, value: Any, frames: list[bytes | memoryview] | None) -> bytes:
        state = _Packing(self, frames)
        # buf_size: the 256 KiB default makes every small encode pay for a large malloc.
        packer = msgpack.Packer(
            default=state.default, use_bin_type=True, strict_types=True, buf_size=4096
        )
        try:
            body: bytes = packer.pack(value)
        except _Unencodable as e:
            steps, (what, rule) = self._locate(value, e.args)
            raise UnencodableError(what, steps, rule) from None
        except ValueError as e:  # msgpack: nested deeper than it allows, or over 4 GiB
            raise CodecError(f"cannot encode the value: {e}") from e
        size = len(body) + state.out_of_band
        if size > self.max_size:
            raise CodecError(f"encoded size {size} bytes exceeds the limit of {self.max_size}")
        return body

    def _locate(self, value: Any, error: tuple[Any, ...]) -> tuple[list[Step], tuple[Any, ...]]:
        """Where the first value msgpack would reject sits, walking in msgpack's order."""
        # Only reached once encoding failed, so the success path never walks the value.
        # Out-of-band packing lets probing a large array cost no copy.
        probe = _Packing(self, [])
        stack: list[tuple[Any, list[Step], int]] = [(value, [], 0)]
        while stack:
            obj, path, depth = stack.pop()
            kind = type(obj)
            if (kind in _NATIVE and (kind is not int or obj in _INT_RANGE)) or depth > _PACK_DEPTH:
                continue
            children: list[tuple[Any, list[Step]]]
            if kind is list:
                children = [(x, [*path, ("item", i)]) for i, x in enumerate(obj)]
            elif kind is dict:
                pairs = [
                    ((k, [*path, ("key", k)]), (v, [*path, ("item", k)])) for k, v in obj.items()
                ]
                children = [child for pair in pairs for child in pair]
            else:
                try:
                    wire = probe.default(obj)
                except _Unencodable as e:
                    return path, e.args
                if type(wire) is not list:
                    continue
                if kind is tuple:
                    children = [(x, [*path, ("item", i)]) for i, x in enumerate(wire[1:])]
                else:
                    children = [(wire[1], [*path, ("ext", kind.__name__)])]
            stack.extend((x, p, depth + 1) for x, p in reversed(children))
        return [], error

    def _unpack(self, body: bytes | memoryview, frames: list[memoryview]) -> Any:
        """Decode ``body``; ``frames`` is empty, or the flat views of all frames, body first."""
        size = sum(map(len, frames)) if frames else len(body)
        if size > self.max_size:
            raise CodecError(f"message of {size} bytes exceeds the limit of {self.max_size}")
        state = _Unpacking(self._by_code, frames)
        # unpackb bounds each max_*_len by len(body) (≤ max_size, checked above), which is
        # tighter than any bound from max_size alone: a few bytes cannot make it
        # preallocate a list of 2**32 items.
        try:
            value = msgpack.unpackb(
                body,
                ext_hook=state.ext_hook,
                list_hook=state.list_hook,
                object_hook=state.map_hook,
                strict_map_key=False,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            # ValueError covers truncation, extra data, bad UTF-8 and nesting too deep;
            # TypeError an unhashable map key.
            raise CodecError(f"malformed message: {type(e).__name__}: {e}") from e
        if state.open_tags or type(value) is _TIMESTAMP:
            raise CodecError("malformed message: a tag or timestamp outside its place")
        if frames and len(state.used) != len(frames) - 1:
            raise CodecError("malformed message: a frame no array refers to")
        return value


class _Packing:
    """One encode call: the frames it collects (None: in-band) and the array bytes so far."""

    __slots__ = ("codec", "frames", "out_of_band", "total")

    def __init__(self, codec: Codec, frames: list[bytes | memoryview] | None) -> None:
        self.codec = codec
        self.frames = frames
        self.out_of_band = 0
        self.total = 0

    def default(self, obj: Any) -> Any:
        """msgpack's hook for every object it does not pack itself (strict_types=True)."""
        kind = type(obj)
        if kind is np.ndarray:
            return self.array(obj, 0)
        if kind is tuple:
            return [_TUPLE_TAG.wire, *obj]
        tag = self.codec._by_type.get(kind)
        if tag is not None and tag.ext is not None:
            return [tag.wire, tag.ext.to_wire(obj)]
        if isinstance(obj, np.generic):
            return self.array(np.asarray(obj), _SCALAR)
        if kind is int:
            what = f"an int out of range ({obj.bit_length()} bits)"
            raise _Unencodable(what, "msgpack ints are -2**63 .. 2**64-1")
        what = f"a value of type {kind.__name__!r}"
        if inspect.isawaitable(obj):
            raise _Unencodable(what, f"a {kind.__name__} is not a value: a missing `await`?")
        raise _Unencodable(what, self.codec._allowed)

    def array(self, arr: np.ndarray[Any, Any], flags: int) -> msgpack.ExtType:
        dtype = arr.dtype
        code = _DTYPE_CODES.get(dtype)
        # The table holds little-endian dtypes, so only a swapped dtype finds its code here.
        swap = code is None
        if swap:
            code = _DTYPE_CODES.get(dtype.newbyteorder("<"))
        if code is None:
            what = "numpy scalar" if flags & _SCALAR else "array"
            raise _Unencodable(f"a {what} of dtype {dtype.str!r}", f"allowed: {_DTYPE_NAMES}")
        if arr.ndim > _MAX_NDIM:
            raise _Unencodable(f"an array of {arr.ndim} dims", f"at most {_MAX_NDIM} travel")
        max_size = self.codec.max_size
        # Before any copy, so an oversized array fails without building a buffer for it.
        self.total += arr.nbytes
        if self.total > max_size:
            raise CodecError(f"arrays of {self.total} bytes exceed the limit of {max_size}")
        if swap:
            arr = arr.astype(dtype.newbyteorder("<"), order="C")
        elif not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        # memoryview refuses to cast a view with a zero in its shape.
        data = arr.data.cast("B") if arr.size else b""
        # A scalar is a value rather than a buffer: it stays in-band even with frames.
        frames = None if flags & _SCALAR else self.frames
        flags |= 0 if frames is None else _OUT_OF_BAND
        head = _HEADS[arr.ndim].pack(flags, code, arr.ndim, _PAD, *arr.shape)
        if frames is None:
            return msgpack.ExtType(_ARRAY, b"".join((head, data)))
        frames.append(data)
        self.out_of_band += arr.nbytes
        return msgpack.ExtType(_ARRAY, head + _FRAME.pack(len(frames) - 1))


class _Unpacking:
    """One decode call: the frames, those arrays used, and how many tags are not yet placed."""

    __slots__ = ("by_code", "frames", "open_tags", "used")

    def __init__(self, by_code: dict[int, _Tag], frames: list[memoryview]) -> None:
        self.by_code = by_code
        self.frames = frames
        self.used: set[int] = set()
        self.open_tags = 0

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == _ARRAY:
            return self.array(data)
        tag = self.by_code.get(code)
        if tag is None or data:
            raise CodecError(f"malformed message: unknown ext type {code} ({len(data)} bytes)")
        self.open_tags += 1
        return tag

    def list_hook(self, items: list[Any]) -> Any:
        # msgpack decodes ext -1 to a Timestamp without calling ext_hook, so the container
        # hooks reject it; map(type, ...) keeps that scan in C.
        if _TIMESTAMP in map(type, items):
            raise CodecError("malformed message: a msgpack timestamp")
        if not items or type(items[0]) is not _Tag:
            return items
        self.open_tags -= 1
        ext = items[0].ext
        if ext is None:
            return tuple(items[1:])
        if len(items) != 2:
            raise CodecError(f"malformed message: {ext.type.__name__} of {len(items)} items")
        try:
            return ext.from_wire(items[1])
        except Exception as e:  # a from_wire rejecting its input is malformed input too
            raise CodecError(f"malformed message: bad {ext.type.__name__}: {e!r}") from e

    def map_hook(self, items: dict[Any, Any]) -> Any:
        if _TIMESTAMP in map(type, items.values()) or _TIMESTAMP in map(type, items):
            raise CodecError("malformed message: a msgpack timestamp")
        return items

    def array(self, data: bytes) -> Any:
        if len(data) < _HEADS[0].size:
            raise CodecError(f"malformed message: array header of {len(data)} bytes")
        flags, code, ndim, pad = _HEADS[0].unpack_from(data)
        start = _HEADS[0].size + 8 * ndim
        oob = flags & _OUT_OF_BAND
        if (
            flags > _OUT_OF_BAND | _SCALAR
            or code >= len(_DTYPES)
            or ndim > _MAX_NDIM
            or pad != _PAD
            or (flags & _SCALAR and (oob or ndim))
            or (len(data) != start + _FRAME.size if oob else len(data) < start)
        ):
            raise CodecError(f"malformed message: bad array header {data[:8].hex()}")
        shape = _HEADS[ndim].unpack_from(data)[4:]
        dtype = _DTYPES[code]
        buf: bytes | memoryview = data
        offset = start
        if oob:
            (index,) = _FRAME.unpack_from(data, start)
            if not 0 < index < len(self.frames) or index in self.used:
                raise CodecError(f"malformed message: bad or reused frame index {index}")
            self.used.add(index)
            buf, offset = self.frames[index], 0
        # Python ints: a product of absurd dims cannot overflow, and nothing is allocated
        # unless the buffer holds exactly the bytes the header declares.
        count = math.prod(shape)
        if count * dtype.itemsize != len(buf) - offset:
            raise CodecError(
                f"malformed message: {dtype.name} array of shape {shape} needs "
                f"{count * dtype.itemsize} bytes, got {len(buf) - offset}"
            )
        try:
            arr = np.frombuffer(buf, dtype, count, offset).reshape(shape)
        except ValueError as e:  # dims past numpy's limits, with a zero among them
            raise CodecError(f"malformed message: array of shape {shape}: {e}") from e
        return arr[()] if flags & _SCALAR else arr


def _no_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"malformed message: ext type {code} in a plain value")


def _flat(buffer: bytes | bytearray | memoryview) -> memoryview:
    """``buffer`` as one flat run of bytes, so that len() counts bytes."""
    try:
        return memoryview(buffer).cast("B")
    except (TypeError, ValueError) as e:
        raise CodecError(f"not a contiguous buffer: {e}") from e


# The default limit and no extensions: enough for values without Tensor or RRef.
_default = Codec()
encode = _default.encode
decode = _default.decode
