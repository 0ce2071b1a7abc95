"""ETSI GS QKD 014 V1.1.1 data formats, parsed strictly and without I/O.

Used by both the client (to validate what a KME says) and the simulator (to validate what
an SAE asks). Every parser raises :class:`Etsi014FormatError` with a message safe to log.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

MAX_SAE_ID_LENGTH = 256
MAX_KEYS_PER_CONTAINER = 1024


class Etsi014FormatError(ValueError):
    """A JSON document that does not follow the ETSI 014 schema."""


class KeySizeMismatchError(Etsi014FormatError):
    """A key of another size than asked for (qkdproxy needs 256 bits)."""


def _object(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise Etsi014FormatError(f"{what} must be a JSON object")
    return data


def _only(data: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise Etsi014FormatError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")


def _int(data: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = data.get(name, default)
    # bool is an int in Python; JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise Etsi014FormatError(f"{name} must be an integer")
    return value


def _str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise Etsi014FormatError(f"{name} must be a string")
    return value


def _str_list(data: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Etsi014FormatError(f"{name} must be a list of strings")
    return tuple(value)


def _object_list(data: Mapping[str, Any], name: str) -> list[Any]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise Etsi014FormatError(f"{name} must be a list")
    return value


def valid_sae_id(sae_id: str) -> bool:
    """Any non-empty SAE id of bounded length: it travels percent-encoded in URL paths
    (:func:`sae_path_segment`), so '#', '/', spaces or non-ASCII letters are all fine."""
    return 0 < len(sae_id) <= MAX_SAE_ID_LENGTH


def sae_path_segment(sae_id: str) -> str:
    """``sae_id`` as one URL path segment: UTF-8, every reserved character percent-encoded
    (the spec's paths carry URL-encoded SAE ids; ``SAE#002`` is ``SAE%23002``). "." and
    ".." are encoded too: as bare segments, servers and proxies would resolve them."""
    segment = quote(sae_id, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_key_id(text: Any) -> str:
    """A key_ID must be a UUID in 8-4-4-4-12 form; return it in lowercase."""
    if not isinstance(text, str) or not _UUID.fullmatch(text):
        raise Etsi014FormatError("key_ID must be a UUID string")
    # The pattern admits ASCII hex digits and hyphens only, so lowercasing the text gives
    # str(uuid.UUID(text)) without building the UUID's int.
    return text.lower()


# The integer fields of a status document, in the order of Status's fields.
STATUS_INTEGERS = (
    "key_size", "stored_key_count", "max_key_count", "max_key_per_request",
    "max_key_size", "min_key_size", "max_SAE_ID_count",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Status:
    """The ``status`` response."""

    source_kme_id: str
    target_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_sae_id_count: int

    def key_size_problem(self, bits: int) -> str | None:
        """None if keys of ``bits`` can be asked for, else why not (naming the fields)."""
        if self.min_key_size <= bits <= self.max_key_size and bits % 8 == 0:
            return None
        return (
            f"key size mismatch: {bits}-bit keys needed, the KME's status allows "
            f"min_key_size={self.min_key_size} to max_key_size={self.max_key_size} "
            f"(key_size={self.key_size})"
        )

    def to_json(self) -> dict[str, Any]:
        """The spec's JSON field names."""
        return {
            "source_KME_ID": self.source_kme_id,
            "target_KME_ID": self.target_kme_id,
            "master_SAE_ID": self.master_sae_id,
            "slave_SAE_ID": self.slave_sae_id,
            "key_size": self.key_size,
            "stored_key_count": self.stored_key_count,
            "max_key_count": self.max_key_count,
            "max_key_per_request": self.max_key_per_request,
            "max_key_size": self.max_key_size,
            "min_key_size": self.min_key_size,
            "max_SAE_ID_count": self.max_sae_id_count,
        }

    @classmethod
    def from_json(cls, data: Any) -> Status:
        """Parse a status document (``status_extension`` is allowed and ignored)."""
        obj = _object(data, "status")
        ints = [_int(obj, name) for name in STATUS_INTEGERS]
        negative = [n for n, v in zip(STATUS_INTEGERS, ints, strict=True) if v < 0]
        if negative:
            raise Etsi014FormatError(f"{', '.join(negative)} must not be negative")
        if ints[3] < 1:
            raise Etsi014FormatError("max_key_per_request must be at least 1")
        if ints[5] > ints[4]:
            raise Etsi014FormatError(f"min_key_size ({ints[5]}) is above max_key_size ({ints[4]})")
        return cls(
            _str(obj, "source_KME_ID"),
            _str(obj, "target_KME_ID"),
            _str(obj, "master_SAE_ID"),
            _str(obj, "slave_SAE_ID"),
            *ints,
        )


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """The ``enc_keys`` request (POST body, or GET ``number``/``size``)."""

    number: int = 1
    size: int | None = None
    additional_slave_sae_ids: tuple[str, ...] = ()
    extension_mandatory: tuple[Any, ...] = ()
    extension_optional: tuple[Any, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Only the fields that are set."""
        body: dict[str, Any] = {"number": self.number}
        if self.size is not None:
            body["size"] = self.size
        if self.additional_slave_sae_ids:
            body["additional_slave_SAE_IDs"] = list(self.additional_slave_sae_ids)
        return body

    @classmethod
    def from_json(cls, data: Any) -> KeyRequest:
        """Parse a POST body; all fields are optional."""
        obj = _object(data, "key request")
        _only(
            obj,
            {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
             "extension_optional"},
            "key request",
        )  # fmt: skip
        return cls(
            number=_int(obj, "number", 1),
            size=_int(obj, "size") if "size" in obj else None,
            additional_slave_sae_ids=_str_list(obj, "additional_slave_SAE_IDs"),
            extension_mandatory=tuple(_object_list(obj, "extension_mandatory")),
            extension_optional=tuple(_object_list(obj, "extension_optional")),
        )


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a key container; the key bytes never appear in ``repr``."""

    key_id: str
    key: bytes = field(repr=False)

    def to_json(self) -> dict[str, str]:
        """``key_ID`` and padded base64 ``key``."""
        return {"key_ID": self.key_id, "key": base64.b64encode(self.key).decode("ascii")}


@dataclass(frozen=True, slots=True)
class KeyContainer:
    """The ``enc_keys`` / ``dec_keys`` response."""

    keys: tuple[Key, ...]

    def to_json(self) -> dict[str, Any]:
        """The spec's JSON."""
        return {"keys": [k.to_json() for k in self.keys]}

    @classmethod
    def from_json(
        cls, data: Any, size_bits: int, max_keys: int = MAX_KEYS_PER_CONTAINER
    ) -> KeyContainer:
        """Parse and check every key: UUID ids, strict base64, exactly ``size_bits`` long."""
        obj = _object(data, "key container")
        entries = _object_list(obj, "keys")
        if not entries or len(entries) > max_keys:
            raise Etsi014FormatError(f"key container must hold 1..{max_keys} keys")
        keys = []
        for index, entry in enumerate(entries):
            # Every message names the field at fault: keys[2].key_ID, keys[0].key, ...
            where = f"keys[{index}]"
            item = _object(entry, where)
            try:
                key_id = parse_key_id(item.get("key_ID"))
            except Etsi014FormatError as exc:
                raise Etsi014FormatError(f"{where}.{exc}") from None
            encoded = item.get("key")
            if not isinstance(encoded, str):
                raise Etsi014FormatError(f"{where}.key must be a base64 string")
            try:
                material = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise Etsi014FormatError(f"{where}.key is not valid base64") from None
            if len(material) * 8 != size_bits:
                raise KeySizeMismatchError(
                    f"key size mismatch: {where}.key is {len(material) * 8} bits, "
                    f"{size_bits} were asked for"
                )
            keys.append(Key(key_id, material))
        if len({k.key_id for k in keys}) != len(keys):
            raise Etsi014FormatError("key container repeats a key_ID")
        return cls(tuple(keys))


@dataclass(frozen=True, slots=True)
class KeyIds:
    """The ``dec_keys`` request body."""

    key_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The spec's JSON."""
        return {"key_IDs": [{"key_ID": k} for k in self.key_ids]}

    @classmethod
    def from_json(cls, data: Any, max_keys: int = MAX_KEYS_PER_CONTAINER) -> KeyIds:
        """Parse; tolerates the ``master_SAE_ID`` some clients add to each entry."""
        obj = _object(data, "key IDs")
        _only(obj, {"key_IDs", "key_IDs_extension"}, "key IDs")
        entries = _object_list(obj, "key_IDs")
        if not entries or len(entries) > max_keys:
            raise Etsi014FormatError(f"key_IDs must hold 1..{max_keys} entries")
        ids = []
        for entry in entries:
            item = _object(entry, "key_IDs entry")
            _only(item, {"key_ID", "key_ID_extension", "master_SAE_ID"}, "key_IDs entry")
            ids.append(parse_key_id(item.get("key_ID")))
        return cls(tuple(ids))


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """The ``Error`` document of 400/401/503 answers."""

    message: str
    details: Sequence[Mapping[str, Any]] = ()

    def to_json(self) -> dict[str, Any]:
        """``message`` and, when present, ``details``."""
        body: dict[str, Any] = {"message": self.message}
        if self.details:
            body["details"] = list(self.details)
        return body

    @classmethod
    def from_json(cls, data: Any) -> ErrorBody:
        """Parse leniently (only ``message`` matters to the client)."""
        obj = _object(data, "error")
        return cls(_str(obj, "message")[:512])
