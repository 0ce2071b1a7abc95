"""Differential fuzzing of the inlined tlslite Parser methods against tlslite's own.

The glue replaces ``Parser.get``, ``getVarBytes``, ``getVarList`` and ``getVarTupleList``
process-wide; they read every ClientHello before the peer is authenticated. Here each is
run against tlslite's original on hostile bytes: the same value, the same error, the same
index left behind, the same length-check state (``startLengthCheck`` and friends call the
replaced ``get``), and the same outcome for whole tlslite messages parsed through them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from tlslite.messages import ClientHello, ServerHello
from tlslite.utils.codec import Parser

from qkdproxy.core.tls import tlslite_glue as glue
from tests.integration.test_wire_hello import Captured
from tests.unit.test_fuzz_parsers import (
    client_hello_fields,
    fuzz_settings,
    mutated,
    real,  # noqa: F401 - fixture
    server_hello_fields,
)

glue.install([])

NAMES = ("get", "getVarBytes", "getVarList", "getVarTupleList")
ARITY = {"get": 1, "getVarBytes": 1, "getVarList": 2, "getVarTupleList": 3}
# Lengths at the TLS vector boundaries, and sizes far past any buffer.
BOUNDARIES = (0, 1, 2, 3, 4, 2**8 - 1, 2**8, 2**16 - 1, 2**16, 2**24 - 1, 2**24, 2**64)
sizes = st.integers(0, 6) | st.sampled_from(BOUNDARIES)
# Length prefixes at the same boundaries, so that "exactly fits" and "one past" both occur.
prefixes = st.sampled_from(BOUNDARIES[:10]).flatmap(
    lambda n: st.integers(1, 3).map(lambda w: (n % 256**w).to_bytes(w, "big"))
)
buffers = st.lists(prefixes | st.binary(max_size=6), max_size=5).map(b"".join)


@contextmanager
def tlslite_parser() -> Iterator[None]:
    """tlslite's own methods on Parser for the duration (every Parser, also the ones
    tlslite makes inside a message's parse)."""
    for name, method in glue._tlslite_parser.items():
        setattr(Parser, name, method)
    try:
        yield
    finally:
        for name, method in glue._FAST_PARSER.items():
            setattr(Parser, name, method)


def outcome(action: Callable[..., Any], *args: int) -> tuple[str, Any]:
    """What ``action(*args)`` returned, or the error it raised (by name and message)."""
    try:
        return "value", action(*args)
    except Exception as exc:  # DecodeError, and tlslite's own errors on parsed content
        return type(exc).__name__, str(exc)


def state(parser: Parser) -> tuple[int, int, int]:
    return parser.index, parser.indexCheck, parser.lengthCheck


def both(run: Callable[[], Any]) -> tuple[Any, Any]:
    """``run`` with tlslite's methods, then with ours."""
    with tlslite_parser():
        theirs = run()
    return theirs, run()


def test_the_fast_methods_are_installed() -> None:
    assert all(getattr(Parser, n) is glue._FAST_PARSER[n] for n in NAMES)
    with tlslite_parser():
        assert all(getattr(Parser, n) is glue._tlslite_parser[n] for n in NAMES)
    assert all(getattr(Parser, n) is glue._FAST_PARSER[n] for n in NAMES)


@fuzz_settings(3000)
@given(
    data=buffers,
    start=st.integers(0, 40),
    name=st.sampled_from(NAMES),
    args=st.tuples(sizes, sizes, sizes),
    check=st.integers(0, 2**16),
)
def test_each_method_as_tlslite(
    data: bytes, start: int, name: str, args: tuple[int, int, int], check: int
) -> None:
    start = min(start, len(data) + 2)  # up to two past the end: unreachable, still checked
    call_args = args[: ARITY[name]]

    def run() -> tuple[Any, ...]:
        parser = Parser(bytearray(data))
        parser.index = start
        parser.setLengthCheck(check)
        result = outcome(getattr(parser, name), *call_args)
        return result, state(parser), outcome(parser.atLengthCheck)

    if name in ("getVarList", "getVarTupleList") and call_args[-1] >= 4:
        # tlslite allocates a list of the claimed length before it reads (up to 2**32 and
        # more elements for a prefix of 4 bytes or wider): that either fails with
        # MemoryError or, with overcommit, fills gigabytes for minutes. tlslite never reads
        # a list length wider than 2 bytes, so a peer cannot get there; ours alone must
        # answer without allocating for the claim (a zero element size divides by zero in
        # both, as no tlslite caller asks for).
        result = run()[0]
        assert result[0] != "MemoryError", result
        return
    theirs, ours = both(run)
    assert theirs == ours, (name, data.hex(), start, call_args)


def read_once(data: bytes, name: str, args: tuple[int, ...]) -> tuple[Any, ...]:
    parser = Parser(bytearray(data))
    return outcome(getattr(parser, name), *args), state(parser)


def test_each_method_as_tlslite_at_length_boundaries() -> None:
    """Every boundary length in every prefix width that holds it, with the buffer ending
    just short of, at and past the claimed end, read as bytes, lists and tuple lists."""
    for claimed in BOUNDARIES[:-1]:
        for width in (w for w in range(1, 5) if claimed < 256**w):
            near = {0, 1, 5, claimed - 1, claimed, claimed + 1}
            for have in sorted(h for h in near if 0 <= h <= 2**16 + 1):
                data = (
                    claimed.to_bytes(width, "big")
                    + bytes(range(256)) * (have // 256)
                    + bytes(range(have % 256))
                )
                for name, args in (
                    ("get", (width,)),
                    ("getVarBytes", (width,)),
                    *(("getVarList", (e, width)) for e in (1, 2, 3, 4)),
                    *(("getVarTupleList", (e, k, width)) for e in (1, 2, 3) for k in (1, 2, 3)),
                ):
                    theirs, ours = both(partial(read_once, data, name, args))
                    assert theirs == ours, (name, args, claimed, width, have)


Step = tuple[str, tuple[int, ...]]
steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(NAMES), st.tuples(st.integers(1, 3), st.integers(1, 2),
                                                    st.integers(1, 3))),
        st.tuples(st.sampled_from(("startLengthCheck",)), st.tuples(st.integers(1, 3))),
        st.tuples(st.sampled_from(("stopLengthCheck", "atLengthCheck")), st.just(())),
    ),
    max_size=8,
)  # fmt: skip


@fuzz_settings(1500)
@given(data=buffers, program=steps)
def test_length_checked_parsing_as_tlslite(data: bytes, program: list[Step]) -> None:
    """A sequence of reads and length checks, as tlslite's parse methods do them, carried on
    after errors: every step's outcome and the parser state after it are tlslite's."""

    def run() -> list[tuple[Any, ...]]:
        parser = Parser(bytearray(data))
        trace = []
        for name, args in program:
            call = args[: ARITY.get(name, len(args))]
            trace.append((outcome(getattr(parser, name), *call), state(parser)))
        return trace

    theirs, ours = both(run)
    assert theirs == ours, (data.hex(), program)


def parsed(message: type, body: bytes) -> tuple[Any, ...]:
    """A tlslite message parsed from ``body`` (its 3-byte length first, as tlslite reads
    it): the outcome, re-serialised when it parsed, and where the parser stopped."""
    parser = Parser(bytearray(body))
    result = outcome(message().parse, parser)
    if result[0] == "value":
        result = ("value", bytes(result[1].write()))
    return result, parser.index


@fuzz_settings(400)
@given(st.data(), st.sampled_from(["qkd", "triple"]), st.booleans())
def test_mutated_hellos_parse_as_with_tlslite_parser(
    real: dict[str, Captured],  # noqa: F811 - fixture
    data: st.DataObject,
    source: str,
    client: bool,
) -> None:
    captured = real[source]
    seed = captured.client_body if client else captured.server_body
    fields = client_hello_fields(seed) if client else server_hello_fields(seed)
    body = data.draw(mutated(seed, fields))
    message = ClientHello if client else ServerHello
    framed = len(body).to_bytes(3, "big") + body
    theirs, ours = both(lambda: parsed(message, framed))
    assert theirs == ours
