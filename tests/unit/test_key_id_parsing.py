"""A KME's key_ID is read as the lowercase UUID text, and only the 8-4-4-4-12 form is."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdproxy.core.etsi014.models import Etsi014FormatError, parse_key_id

# Each character of the text in upper or lower case.
cases = st.lists(st.booleans(), min_size=36, max_size=36)


@given(st.uuids(), cases)
def test_any_case_reads_as_the_uuids_own_text(key_id: uuid.UUID, upper: list[bool]) -> None:
    text = "".join(c.upper() if up else c for c, up in zip(str(key_id), upper, strict=True))
    assert parse_key_id(text) == str(uuid.UUID(text)) == str(key_id)


@given(st.text(alphabet="0123456789abcdefABCDEF-{}:urnidxX \n\u0660\uff11", max_size=45))
def test_accepted_text_is_exactly_a_uuid_in_canonical_form(text: str) -> None:
    try:
        parsed = parse_key_id(text)
    except Etsi014FormatError:
        return
    assert parsed == str(uuid.UUID(text))
    assert len(text) == 36 and [len(part) for part in text.split("-")] == [8, 4, 4, 4, 12]


@pytest.mark.parametrize(
    "text",
    [
        # uuid.UUID takes each of these; a key_ID must not be any of them.
        "{12345678-1234-5678-1234-567812345678}",
        "urn:uuid:12345678-1234-5678-1234-567812345678",
        "12345678123456781234567812345678",
        "12345678-1234-5678-1234-567812345678\n",
        # Non-ASCII digits (int() would read them).
        "12345678-1234-5678-1234-56781234567\u0661",
        "12345678-1234-5678-1234-56781234567\uff11",
        "1234567-81234-5678-1234-567812345678",
        "",
        "g2345678-1234-5678-1234-567812345678",
    ],
)
def test_other_forms_are_refused(text: str) -> None:
    with pytest.raises(Etsi014FormatError):
        parse_key_id(text)


@pytest.mark.parametrize("value", [None, 7, b"12345678-1234-5678-1234-567812345678", ["x"]])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(Etsi014FormatError):
        parse_key_id(value)
