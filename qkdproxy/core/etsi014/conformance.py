"""ETSI GS QKD 014 conformance verdicts, without I/O (``qkdproxy kme-check`` runs the calls).

Each function judges one answer of a KME (status code, content type, body) and returns a
:class:`Result` naming the spec section (ETSI GS QKD 014 V1.1.1) it checks. WARN marks a
deviation qkdproxy copes with; FAIL one that breaks the spec's guarantees or qkdproxy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from qkdproxy.core.etsi014.models import (
    STATUS_INTEGERS,
    ErrorBody,
    Etsi014FormatError,
    KeyContainer,
    Status,
)

KEY_BITS = 256
# Keys drawn at most: enc_keys POST (1), GET (1), two in one request (2), the key used to
# provoke a 401 (1), and one if the KME wrongly honours a size that is not a multiple of 8.
KEY_BUDGET = 6
SPEC_NOT_FOUND = "one or more keys specified are not found on KME"
SPEC_SIZE_MESSAGE = "size shall be a multiple of 8"


class Verdict(StrEnum):
    """The outcome of one check."""

    PASS = "PASS"  # noqa: S105 - a verdict, not a password
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True, slots=True)
class Result:
    """One line of the report."""

    check: str
    section: str
    verdict: Verdict
    detail: str

    def to_json(self) -> dict[str, str]:
        """For ``--json``."""
        return {
            "check": self.check,
            "section": self.section,
            "result": self.verdict.value,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Answer:
    """What a KME answered to one HTTP request."""

    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        """The body as JSON; None if it is not JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None

    def error_message(self) -> str | None:
        """The ``message`` of an ETSI 014 Error document, None if the body is not one."""
        try:
            return ErrorBody.from_json(self.json()).message
        except Etsi014FormatError:
            return None

    def describe(self) -> str:
        """``HTTP 400 "message"`` or ``HTTP 401 (text/html body)``, for details."""
        message = self.error_message()
        if message is not None:
            return f"HTTP {self.status} {message!r}"
        return f"HTTP {self.status} ({self.content_type or 'no'} body, not an Error document)"


def result(check: str, section: str, verdict: Verdict, detail: str) -> Result:
    """Shorthand."""
    return Result(check, section, verdict, detail)


def judge_status(answer: Answer, master_sae: str, slave_sae: str) -> tuple[Result, Status | None]:
    """5.2 / 6.1: every field there with its type, the SAE ids right, 256-bit keys possible."""
    name, section = "status-fields", "5.2, 6.1"
    if answer.status != 200:
        return result(name, section, Verdict.FAIL, f"status answered {answer.describe()}"), None
    document = answer.json()
    try:
        status = Status.from_json(document)
    except Etsi014FormatError as exc:
        return result(name, section, Verdict.FAIL, f"status document: {exc}"), None
    problems = []
    if (status.master_sae_id, status.slave_sae_id) != (master_sae, slave_sae):
        problems.append(
            f"master_SAE_ID/slave_SAE_ID are {status.master_sae_id!r}/{status.slave_sae_id!r}, "
            f"expected {master_sae!r}/{slave_sae!r}"
        )
    if not status.source_kme_id or not status.target_kme_id:
        problems.append("source_KME_ID or target_KME_ID is empty")
    if size_problem := status.key_size_problem(KEY_BITS):
        return result(name, section, Verdict.FAIL, size_problem), status
    extra = sorted(
        set(document)
        - {
            *STATUS_INTEGERS,
            "source_KME_ID",
            "target_KME_ID",
            "master_SAE_ID",
            "slave_SAE_ID",
            "status_extension",
        }
    )
    if extra:
        problems.append(f"fields outside the spec: {', '.join(extra)}")
    if problems:
        return result(name, section, Verdict.WARN, "; ".join(problems)), status
    return result(
        name,
        section,
        Verdict.PASS,
        f"all 11 fields; {status.stored_key_count} keys stored, key_size {status.key_size}",
    ), status


def judge_max_per_request(status: Status) -> Result:
    """6.1: max_key_per_request; 1 is legal but costs one request per key."""
    name, section = "max-key-per-request", "6.1"
    value = status.max_key_per_request
    if value == 1:
        return result(
            name,
            section,
            Verdict.WARN,
            "max_key_per_request is 1: one key per request (qkdproxy copes, batches of one)",
        )
    return result(name, section, Verdict.PASS, f"max_key_per_request is {value}")


def judge_container(
    check: str, section: str, answer: Answer, number: int
) -> tuple[Result, KeyContainer | None]:
    """6.3: a key container of ``number`` 256-bit keys with UUID key_IDs."""
    if answer.status != 200:
        return result(check, section, Verdict.FAIL, f"answered {answer.describe()}"), None
    try:
        container = KeyContainer.from_json(answer.json(), KEY_BITS, max_keys=number)
    except Etsi014FormatError as exc:
        return result(check, section, Verdict.FAIL, f"key container: {exc}"), None
    if len(container.keys) != number:
        detail = f"asked for {number} keys, got {len(container.keys)}"
        return result(check, section, Verdict.FAIL, detail), container
    return result(check, section, Verdict.PASS, f"{number} x 256-bit key, UUID key_ID"), container


def judge_same_keys(check: str, section: str, answer: Answer, expected: KeyContainer) -> Result:
    """5.4: dec_keys gives the slave the very keys the master got."""
    verdict, container = judge_container(check, section, answer, len(expected.keys))
    if container is None or verdict.verdict is not Verdict.PASS:
        return verdict
    if {(k.key_id, k.key) for k in container.keys} != {(k.key_id, k.key) for k in expected.keys}:
        return result(check, section, Verdict.FAIL, "the slave got other keys than the master")
    return result(check, section, Verdict.PASS, "the slave got the master's keys")


def judge_not_found(check: str, section: str, answer: Answer) -> Result:
    """5.4: an unknown (or already delivered) key: 400 with an Error document."""
    message = answer.error_message()
    if answer.status == 400 and message == SPEC_NOT_FOUND:
        return result(check, section, Verdict.PASS, f"HTTP 400 {message!r}")
    if answer.status == 400:
        return result(
            check,
            section,
            Verdict.WARN,
            f"{answer.describe()}: not the spec's message {SPEC_NOT_FOUND!r} "
            "(qkdproxy goes by the code)",
        )
    if answer.status == 404:
        return result(
            check,
            section,
            Verdict.WARN,
            f"{answer.describe()}: 404 for unknown keys, the spec says 400 (qkdproxy copes)",
        )
    return result(check, section, Verdict.FAIL, f"answered {answer.describe()}, expected 400")


def judge_single_use(answer: Answer) -> Result:
    """5.4: a key handed out is gone: asking for it again is 'not found'."""
    name, section = "single-use", "5.4"
    if answer.status == 200:
        return result(
            name,
            section,
            Verdict.FAIL,
            "dec_keys handed out the same key twice: keys are not single use",
        )
    return judge_not_found(name, section, answer)


def judge_unauthorised(answer: Answer) -> Result:
    """5.4: dec_keys by an SAE not named as slave of the keys: 401 with an Error document."""
    name, section = "unauthorised-dec-keys", "5.4"
    if answer.status == 200:
        return result(
            name, section, Verdict.FAIL, "the KME gave keys to an SAE that is not their slave"
        )
    if answer.status != 401:
        return result(name, section, Verdict.WARN, f"answered {answer.describe()}, expected 401")
    if answer.error_message() is None:
        return result(
            name,
            section,
            Verdict.WARN,
            f"{answer.describe()}: the 401 body is not "
            "an Error document (qkdproxy goes by the code)",
        )
    return result(name, section, Verdict.PASS, answer.describe())


def judge_bad_size(answer: Answer) -> Result:
    """6.2 / 5.3: a size that is not a multiple of 8 is refused with 400."""
    name, section = "bad-size-refused", "5.3, 6.2"
    if answer.status == 200:
        return result(name, section, Verdict.FAIL, "keys of 255 bits were handed out")
    if answer.status != 400:
        return result(name, section, Verdict.FAIL, f"answered {answer.describe()}, expected 400")
    if answer.error_message() != SPEC_SIZE_MESSAGE:
        return result(
            name,
            section,
            Verdict.WARN,
            f"{answer.describe()}: not the spec's message {SPEC_SIZE_MESSAGE!r}",
        )
    return result(name, section, Verdict.PASS, answer.describe())


def judge_encoded_sae(answer: Answer, slave_sae: str) -> Result:
    """5.2: the SAE id in the path is URL-encoded; the KME decodes it."""
    name, section = "sae-id-encoding", "5.2"
    if answer.status != 200:
        return result(
            name,
            section,
            Verdict.WARN,
            f"status with the slave SAE id fully "
            f"percent-encoded answered {answer.describe()}: the KME does not decode "
            "SAE ids in paths (ids with reserved characters will fail)",
        )
    document = answer.json()
    got = document.get("slave_SAE_ID") if isinstance(document, dict) else None
    if got != slave_sae:
        return result(name, section, Verdict.WARN, f"decoded to slave_SAE_ID {got!r}")
    return result(name, section, Verdict.PASS, "percent-encoded SAE id decoded")


def percent_encode_all(text: str) -> str:
    """Every byte of ``text`` (UTF-8) as %XX: what a decoding KME must turn back."""
    return "".join(f"%{b:02X}" for b in text.encode())


def render_table(results: Sequence[Result]) -> str:
    """The report as a text table."""
    rows = [("CHECK", "SECTION", "RESULT", "DETAIL")]
    rows += [(r.check, r.section, r.verdict.value, r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}"
        for row in rows
    )
