"""Messages as they come off the wire: the well-formed ones decode, and every near miss (a
bool for an int, a list for a tuple, an unknown kind, a missing or mistyped field) is a
`MessageError`, whichever way `from_wire` checks it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from asyncgrad.codec import Codec
from asyncgrad.messages import (
    AUTOGRAD_RECORDS,
    Call,
    ContextRecord,
    ContextRelease,
    Grad,
    Header,
    Kind,
    MessageError,
    PassAbort,
    PassDone,
    PassStart,
)

HEADER = {"k": int(Kind.CALL), "i": 7, "s": "driver"}
CALL = {"f": "echo", "a": (1, 2)}


class Int(int):
    """An int subclass: msgpack never makes one, so neither path need accept it."""


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (HEADER, Header(Kind.CALL, 7, "driver")),
        (
            {**HEADER, "r": 3, "c": [1, 2, [5]]},
            Header(Kind.CALL, 7, "driver", 3, ContextRecord(1, 2, (5,))),
        ),
        ({**HEADER, "k": int(Kind.REPLY)}, Header(Kind.REPLY, 7, "driver")),
    ],
)
def test_well_formed_headers_decode(wire: dict[str, Any], expected: Header) -> None:
    assert Header.from_wire(wire) == expected


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [HEADER],
        {**HEADER, "k": 9999},
        {**HEADER, "k": True},
        {**HEADER, "k": "1"},
        {**HEADER, "i": True},
        {**HEADER, "i": 7.0},
        {**HEADER, "i": None},
        {k: v for k, v in HEADER.items() if k != "i"},
        {**HEADER, "s": b"driver"},
        {k: v for k, v in HEADER.items() if k != "s"},
        {**HEADER, "r": False},
        {**HEADER, "r": "3"},
        {**HEADER, "c": [1, 2]},
        {**HEADER, "c": "context"},
        {**HEADER, "c": [1, True, []]},
        {**HEADER, "c": [1, 2, ["3"]]},
    ],
)
def test_malformed_headers_are_message_errors(wire: Any) -> None:
    with pytest.raises(MessageError):
        Header.from_wire(wire)


def test_header_int_subclasses_decode_as_ints() -> None:
    # isinstance rules, the contract's: a subclass of int is an int (bool excepted).
    header = Header.from_wire({**HEADER, "i": Int(7)})
    assert header.id == 7


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (CALL, Call("echo", (1, 2), {})),
        ({"f": "echo"}, Call("echo", (), {})),
        ({**CALL, "w": {"x": 1}}, Call("echo", (1, 2), {"x": 1})),
        ({**CALL, "t": 5, "m": "add", "o": True}, Call("echo", (1, 2), {}, 5, "add", True)),
    ],
)
def test_well_formed_calls_decode(wire: dict[str, Any], expected: Call) -> None:
    assert Call.from_wire(wire) == expected


@pytest.mark.parametrize(
    "wire",
    [
        None,
        ("echo", ()),
        {**CALL, "f": 1},
        {**CALL, "f": None},
        {k: v for k, v in CALL.items() if k != "f"},
        {**CALL, "a": [1, 2]},
        {**CALL, "a": None},
        {**CALL, "t": True},
        {**CALL, "t": "5"},
        {**CALL, "m": 1},
        {**CALL, "o": 1},
        {**CALL, "o": "yes"},
        {**CALL, "w": [("x", 1)]},
        {**CALL, "w": {1: "x"}},
    ],
)
def test_malformed_calls_are_message_errors(wire: Any) -> None:
    with pytest.raises(MessageError):
        Call.from_wire(wire)


@pytest.mark.parametrize(
    "record",
    [
        Grad(1, 2, 3, None),
        Grad(1, 2, 3, (np.ones(2, dtype=np.float32), None)),
        PassStart(1, 2, True),
        PassDone(1, 2),
        PassAbort(1, 2, ("ValueError", "bad", "w1")),
        ContextRelease((1, 2, 3)),
    ],
)
def test_autograd_records_round_trip(record: Any) -> None:
    # Through the codec, as they travel: tuples stay tuples, lists come back as lists.
    wire = Codec().decode(Codec().encode(record.to_wire()))
    back = AUTOGRAD_RECORDS[record.kind].from_wire(wire)
    assert type(back) is type(record)
    assert repr(back) == repr(record)


@pytest.mark.parametrize(
    ("kind", "wire"),
    [
        (Kind.GRAD, {"c": 1, "p": 2}),
        (Kind.GRAD, {"c": 1, "p": 2, "m": 3, "g": "grads"}),
        (Kind.GRAD, {"c": "1", "p": 2, "m": 3}),
        (Kind.PASS_START, {"c": 1}),
        (Kind.PASS_START, {"c": 1, "p": 2, "r": 1}),
        (Kind.PASS_DONE, {"c": 1, "p": None}),
        (Kind.PASS_ABORT, {"c": 1, "p": 2, "e": ("ValueError", "bad")}),
        (Kind.PASS_ABORT, {"c": 1, "p": 2}),
        (Kind.CONTEXT_RELEASE, {"c": 0, "r": [1, "2"]}),
        (Kind.CONTEXT_RELEASE, [1, 2]),
    ],
)
def test_malformed_autograd_records_are_message_errors(kind: Kind, wire: Any) -> None:
    with pytest.raises(MessageError):
        AUTOGRAD_RECORDS[kind].from_wire(wire)
