"""The daemon's TOML configuration: parsed and validated up front.

Every problem is reported with the file, the key and what is wrong, all at once, before
anything starts. File contents (certificates, keys) are loaded later, by the daemon.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qkdproxy.core.addresses import Address, AddressError, TcpAddress, parse_address
from qkdproxy.core.errors import SettingError
from qkdproxy.core.etsi004.qos import NEGOTIABLE, QosPolicy
from qkdproxy.core.etsi014.models import MAX_SAE_ID_LENGTH
from qkdproxy.core.policy import GroupPlan, Policy, plan_groups
from qkdproxy.core.tls.certpolicy import CertificatePolicy
from qkdproxy.core.tls.engine import DEFAULT_ENGINE, ENGINES
from qkdproxy.core.tls.identity import AllowRule
from qkdproxy.core.tls.keyexchange import Flow, KeyApi
from qkdproxy.keys.kme_identity import ExpectedKme
from qkdproxy.keys.preauth import CLIENT_INITIATED, SERVER_INITIATED, Budget, PreAuthSettings
from qkdproxy.keys.supply import SupplySettings

SECTIONS = ("daemon", "kme", "tunnel", "status")
# HTTP/2 streams one multiplexed tunnel may carry at once (each holds a receive window).
MAX_MUX_STREAMS = 1000
# Connection log lines: how long one may wait for the write it shares with the next ones
# (20 ms: a burst of connections costs one write per 20 ms instead of one per connection;
# a process killed outright loses at most that). More than a second would hide an outage.
DEFAULT_LOG_FLUSH_MS = 20.0
MAX_LOG_FLUSH_MS = 1000.0


class ConfigError(SettingError):
    """One or more problems in a configuration file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class KmeConfig:
    """How a tunnel reaches its KME (paths resolved relative to the config file)."""

    name: str
    api: KeyApi
    endpoint: str
    sae_id: str
    peer_sae_id: str
    cert: Path
    key: Path
    ca: Path
    # ETSI 014: the longest wait between trial calls to a KME that is down (the circuit
    # breaker's backoff cap), so the longest a recovered KME waits to be used again.
    max_retry_interval_s: float = 30.0
    prefetch: bool = True
    # Issue 12: the key supply held ahead, and the link's pre-authentication budget.
    supply: SupplySettings = field(default_factory=SupplySettings)
    preauth_link: Budget = field(default_factory=lambda: Budget(10.0, 20.0))
    # What the KME's certificate must meet (docs/SECURITY.md says what is enforced where).
    cert_policy: CertificatePolicy = field(default_factory=CertificatePolicy)
    # ETSI 004 responder: KME work for KSIDs named in unauthenticated hellos (qkd/responder.py).
    peer_streams_per_source: int = 2
    peer_streams_max: int = 4
    peer_stream_wait_s: float = 0.5
    # Names the KME certificate must carry instead of the URL's host (cn:/dns:/uri: rules).
    kme_identity: tuple[str, ...] = ()
    # ETSI 004: the QoS asked for and the bounds a counter-proposal must stay within.
    qos: QosPolicy | None = None


@dataclass(frozen=True, slots=True)
class MuxSettings:
    """Application connections as HTTP/2 CONNECT streams inside pooled tunnels."""

    enabled: bool = False
    max_streams: int = 100
    pool_min: int = 1
    pool_max: int = 4
    rotate_s: float = 3600.0
    rotate_bytes: int = 1 << 34
    keepalive_s: float = 15.0
    idle_s: float = 60.0


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """One tunnel."""

    name: str
    role: str
    listen: Address
    connect: Address
    cert: Path
    key: Path
    ca: Path
    allow: tuple[str, ...]
    allow_any_peer: bool
    policy: Policy
    plan: GroupPlan
    kme: str | None
    flow: Flow
    server_name: str | None
    max_connections: int = 100
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 3600.0
    max_lifetime_s: float = 0.0
    allow_public_plaintext: bool = False
    rekey_bytes: int = 1 << 30
    rekey_interval_s: float = 3600.0
    # Extended Key Update (fresh key exchanges, qkdproxy peers only; docs/CONFIGURATION.md).
    fresh_key_update: bool = True
    require_fresh_key_update: bool = False
    fresh_key_interval_s: float = 600.0
    fresh_key_bytes: int = 64 << 30
    proxy_protocol: bool = False
    # The TLS 1.3 handshake engine: "native" (ours) or "tlslite" (core/tls/engine.py).
    tls_engine: str = DEFAULT_ENGINE
    # Server tunnels: the QKD flows served and what an unauthenticated hello may cost.
    preauth: PreAuthSettings = field(default_factory=PreAuthSettings)
    # Admission control (docs/CONFIGURATION.md, "Admission control"); 0 turns one off.
    max_connections_per_source: int = 0
    max_handshakes: int = 128
    max_handshakes_per_source: int = 64
    handshake_rate_per_source: float = 100.0
    handshake_burst_per_source: float = 200.0
    first_byte_timeout_s: float = 2.0
    hello_timeout_s: float = 5.0
    refusal_log_interval_s: float = 10.0
    # What the peer's certificate must meet beyond a valid chain (tls/certpolicy.py).
    cert_policy: CertificatePolicy = field(default_factory=CertificatePolicy)
    # Paper-era reference (0.1.x) servers do not echo the key id (client-initiated flow).
    accept_unechoed_key_id: bool = False
    # Multiplexed tunnels between qkdproxy peers (docs/CONFIGURATION.md, "Multiplexing").
    mux: MuxSettings = field(default_factory=MuxSettings)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Process-wide settings."""

    drain_timeout_s: float = 300.0
    log_level: str = "info"
    # "text" (readable) or "json" (one object per line); both in UTC.
    log_format: str = "text"
    # Connection lines within this long of the last flush share one write (logformat.py).
    log_flush_ms: float = DEFAULT_LOG_FLUSH_MS
    # The status listener (/metrics, /healthz, /readyz, /status); None: not served.
    status_listen: TcpAddress | None = None
    # Refuse every risky setting instead of warning (qkdproxy/daemon/risk.py; also --strict).
    strict: bool = False
    # Accept private key files that group or others can access (warned about).
    allow_readable_keys: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration."""

    path: Path
    daemon: DaemonConfig
    kmes: dict[str, KmeConfig] = field(default_factory=dict)
    tunnels: tuple[TunnelConfig, ...] = ()


# The expected type in plain words (TOML's vocabulary, not Python's).
_KIND_WORDS: dict[type, str] = {
    str: "a string", int: "an integer", float: "a number", bool: "true or false",
    list: "a list", dict: "a table",
}  # fmt: skip


def describe_value(value: Any) -> str:
    """What a TOML value is, for an error message: ``the string "100"``."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {json.dumps(value)[:60]}"
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**20 else "(a very large integer)"
        return f"the integer {text}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"the {type(value).__name__} {value}"


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean "x"?)`` when ``word`` is close to a known one, else empty."""
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def tunnel_where(name: str) -> str:
    """How errors name a tunnel: ``tunnel.web``, or ``tunnel."my tunnel"``."""
    return (
        f"tunnel.{name}" if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f"tunnel.{json.dumps(name)}"
    )


class _Reader:
    """Typed access to one TOML table that records problems instead of raising.

    Every key a section accepts is read through :meth:`get`, so the keys read are the known
    keys: :meth:`check_unknown` suggests the nearest for a misspelt one with no list to keep.
    """

    def __init__(self, data: Mapping[str, Any], where: str, problems: list[str]) -> None:
        self.data, self.where, self.problems = data, where, problems
        self.used: set[str] = set()

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where}.{key}: {message}")

    def get(
        self, key: str, kind: type, default: Any = None, required: bool = False, hint: str = ""
    ) -> Any:
        """The value of ``key`` if it is a ``kind``; ``hint`` shows the expected form."""
        self.used.add(key)
        if key not in self.data:
            if required:
                self.fail(key, "is required" + (f": {hint}" if hint else ""))
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            # TOML integers are unbounded here: one beyond float range is not a number we use.
            ok = abs(value) <= 2**1000
            value = float(value) if ok else default
        if not ok:
            expected = _KIND_WORDS.get(kind, kind.__name__) + (f" ({hint})" if hint else "")
            self.fail(key, f"must be {expected}, not {describe_value(self.data[key])}")
            return default
        return value

    def positive(self, key: str, default: float, allow_zero: bool = False) -> float:
        value = self.get(key, float, default)
        # TOML has inf and nan: neither is a usable count, size or duration (nan also
        # passes every comparison below, and int() of either raised).
        if not math.isfinite(value):
            self.fail(key, "must be a finite number")
            return default
        if value < 0 or (value == 0 and not allow_zero):
            self.fail(key, "must be positive" + (" or 0 (off)" if allow_zero else ""))
        return float(value)

    def count(self, key: str, default: int) -> int:
        """A positive whole number (``"100"`` and ``2.5`` are refused, with what they are)."""
        value = self.get(key, int, default)
        if value < 1:
            self.fail(key, f"must be a positive integer, not {describe_value(value)}")
            return default
        return int(value)

    def path(self, key: str, base: Path) -> Path:
        text = self.get(key, str, "", required=True, hint="a file path")
        return (base / text) if text else base

    def check_unknown(self) -> None:
        for key in sorted(set(self.data) - self.used):
            self.fail(key, "unknown key" + did_you_mean(key, self.used))


def load_config(path: Path | str) -> Config:
    """Read and validate ``path``; :class:`ConfigError` lists every problem found."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    problems: list[str] = []
    config = _parse(data, path, problems)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return config


def _table(value: Any, where: str, problems: list[str]) -> dict[str, Any] | None:
    """``value`` if it is a TOML table, else None and a problem.

    A scalar or array where a table belongs (``daemon = 5``, ``[tunnel]`` for ``[[tunnel]]``)
    would otherwise reach ``_Reader`` and fail with a TypeError instead of a ConfigError.
    """
    if isinstance(value, dict):
        return value
    problems.append(f"{where}: must be a table")
    return None


def _parse(data: dict[str, Any], path: Path, problems: list[str]) -> Config:
    for key in sorted(set(data) - set(SECTIONS)):
        problems.append(f"{key}: unknown section" + did_you_mean(key, SECTIONS))
    base = path.parent
    daemon = _Reader(_table(data.get("daemon", {}), "daemon", problems) or {}, "daemon", problems)
    status = _table(data.get("status", {}), "status", problems)
    daemon_config = DaemonConfig(
        drain_timeout_s=daemon.positive("drain_timeout_s", 300.0),
        log_level=daemon.get("log_level", str, "info"),
        log_format=daemon.get("log_format", str, "text"),
        log_flush_ms=daemon.positive("log_flush_ms", DEFAULT_LOG_FLUSH_MS, allow_zero=True),
        status_listen=_status(
            _Reader(status or {}, "status", problems), "status" in data and status is not None
        ),
        strict=bool(daemon.get("strict", bool, False)),
        allow_readable_keys=bool(daemon.get("allow_readable_keys", bool, False)),
    )
    if daemon_config.log_level not in ("debug", "info", "warning", "error"):
        daemon.fail("log_level", "must be debug, info, warning or error")
    if daemon_config.log_format not in ("text", "json"):
        daemon.fail("log_format", 'must be "text" or "json"')
    if daemon_config.log_flush_ms > MAX_LOG_FLUSH_MS:
        daemon.fail("log_flush_ms", f"must be at most {MAX_LOG_FLUSH_MS:g} (ms)")
    daemon.check_unknown()
    kmes = {}
    for name, table in (_table(data.get("kme", {}), "kme", problems) or {}).items():
        kme_table = _table(table, f"kme.{name}", problems)
        if kme_table is not None and (
            kme := _kme(name, _Reader(kme_table, f"kme.{name}", problems), base)
        ):
            kmes[name] = kme
    tunnel_tables = data.get("tunnel", [])
    if not isinstance(tunnel_tables, list):
        problems.append("tunnel: must be an array of tables ([[tunnel]])")
        tunnel_tables = []
    tunnels = [
        _tunnel(i, _Reader(table, f"tunnel[{i}]", problems), base, kmes)
        for i, t in enumerate(tunnel_tables)
        if (table := _table(t, f"tunnel[{i}]", problems)) is not None
    ]
    names = [t.name for t in tunnels if t is not None]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"tunnel: name {name!r} is used twice")
    if not tunnels:
        problems.append("tunnel: at least one [[tunnel]] is required")
    return Config(path, daemon_config, kmes, tuple(t for t in tunnels if t is not None))


def _status(r: _Reader, present: bool) -> TcpAddress | None:
    if not present:
        return None
    address = _address(r, "listen") if "listen" in r.data else TcpAddress("127.0.0.1", 9100)
    if address is not None and not isinstance(address, TcpAddress):
        r.fail("listen", "the status listener is host:port")
        address = None
    allow_public = r.get("allow_public", bool, False)
    if isinstance(address, TcpAddress) and not address.loopback and not allow_public:
        r.fail("listen", "not loopback (set allow_public = true to expose it)")
    r.check_unknown()
    return address if isinstance(address, TcpAddress) else None


def _kme(name: str, r: _Reader, base: Path) -> KmeConfig | None:
    api_text = r.get("api", str, "014")
    if api_text not in ("014", "004"):
        r.fail("api", 'must be "014" or "004"')
        api_text = "014"
    api = KeyApi(api_text)
    endpoint_key = "url" if api is KeyApi.ETSI_014 else "address"
    endpoint = r.get(endpoint_key, str, "", required=True)
    if api is KeyApi.ETSI_014 and endpoint and not endpoint.startswith("https://"):
        r.fail("url", "must be an https:// URL (ETSI 014 requires TLS)")
    elif api is KeyApi.ETSI_014 and "@" in urlsplit(endpoint).netloc:
        # /status shows the URL and aiohttp would send it as a password on every call.
        r.fail("url", "must not carry a user name or password (a KME authenticates "
                      "qkdproxy by its TLS client certificate)")  # fmt: skip
    config = KmeConfig(
        name=name,
        api=api,
        endpoint=endpoint,
        sae_id=r.get("sae_id", str, "", required=True),
        peer_sae_id=r.get("peer_sae_id", str, "", required=True),
        cert=r.path("cert", base),
        key=r.path("key", base),
        ca=r.path("ca", base),
        max_retry_interval_s=r.positive("max_retry_interval_s", 30.0),
        prefetch=r.get("prefetch", bool, True),
        supply=_supply(r),
        preauth_link=Budget(
            r.positive("preauth_keys_per_s", 10.0), r.positive("preauth_keys_burst", 20.0)
        ),
        cert_policy=_cert_policy(r),
        peer_streams_per_source=int(r.positive("peer_streams_per_source", 2)),
        peer_streams_max=int(r.positive("peer_streams_max", 4)),
        peer_stream_wait_s=r.positive("peer_stream_wait_s", 0.5),
    )
    config = replace(config, kme_identity=_kme_identity(r), qos=_qos(r, api))
    # Any non-empty SAE id: ETSI 014 paths carry it percent-encoded ('#', '/', spaces...).
    for key in ("sae_id", "peer_sae_id"):
        if len(getattr(config, key)) > MAX_SAE_ID_LENGTH:
            r.fail(key, f"longer than {MAX_SAE_ID_LENGTH} characters")
    r.check_unknown()
    return config


def _qos(r: _Reader, api: KeyApi) -> QosPolicy | None:
    """``qos = {min_bps = ..., ...}`` and ``qos_bounds = {jitter = [low, high], ...}``."""
    values = r.get("qos", dict, None)
    bounds = r.get("qos_bounds", dict, None)
    if values is None and bounds is None:
        return None
    if api is not KeyApi.ETSI_004:
        r.fail("qos", 'QoS is an ETSI 004 setting (api = "004")')
        return None
    values, bounds = values or {}, bounds or {}
    unknown = sorted(set(values) - set(NEGOTIABLE))
    if unknown:
        r.fail("qos", f"unknown field(s) {', '.join(unknown)} (known: {', '.join(NEGOTIABLE)})")
        return None
    pairs = []
    for name, bound in bounds.items():
        if not (
            isinstance(bound, list)
            and len(bound) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) for b in bound)
        ):
            r.fail("qos_bounds", f"{name} must be [low, high] (integers)")
            return None
        pairs.append((str(name), bound[0], bound[1]))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
        r.fail("qos", "values must be integers")
        return None
    try:
        return QosPolicy(**values, bounds=tuple(pairs))
    except ValueError as exc:
        r.fail("qos_bounds" if "bounds" in str(exc) or "negotiated" in str(exc) else "qos",
               str(exc))  # fmt: skip
        return None


def _kme_identity(r: _Reader) -> tuple[str, ...]:
    r.used.add("kme_identity")
    value = r.data.get("kme_identity", [])
    rules = [value] if isinstance(value, str) else value
    if not isinstance(rules, list) or not all(isinstance(i, str) for i in rules):
        r.fail("kme_identity", "must be a string or a list of strings (cn:, dns:, uri:)")
        return ()
    try:
        return tuple(rules) if rules and ExpectedKme.parse(rules) else ()
    except ValueError as exc:
        r.fail("kme_identity", str(exc))
        return ()


def _supply(r: _Reader) -> SupplySettings:
    # A bad value is reported by ``r``; a usable one stands in so that parsing goes on.
    floor = max(0, int(r.positive("supply_floor", 4, allow_zero=True)))
    ceiling = max(1, int(r.positive("supply_ceiling", 128)))
    if ceiling < floor:
        r.fail("supply_ceiling", "must be at least supply_floor")
        ceiling = floor
    margin = r.positive("supply_margin", 6.0)
    if margin < 1:
        r.fail("supply_margin", "must be at least 1")
    max_age = r.positive("max_key_age_s", 120.0)
    return SupplySettings(
        floor=floor, ceiling=ceiling, max_age_s=max_age if max_age > 0 else 120.0,
        margin=max(1.0, margin),
    )  # fmt: skip


FLOW_NAMES = {
    "client": CLIENT_INITIATED, CLIENT_INITIATED: CLIENT_INITIATED,
    "server": SERVER_INITIATED, SERVER_INITIATED: SERVER_INITIATED,
}  # fmt: skip


def _preauth(r: _Reader, role: str) -> PreAuthSettings:
    flows_given = r.get("flows", list, None)
    flows = {CLIENT_INITIATED}
    if flows_given is not None:
        if role == "client":
            r.fail("flows", "is for server tunnels (a client tunnel uses flow)")
        unknown = [f for f in flows_given if not isinstance(f, str) or f not in FLOW_NAMES]
        if unknown or not flows_given:
            r.fail("flows", 'must be a non-empty list of "client" and "server"')
        flows = {FLOW_NAMES[f] for f in flows_given if isinstance(f, str) and f in FLOW_NAMES}
    return PreAuthSettings(
        flows=frozenset(flows),
        per_source=Budget(
            r.positive("preauth_keys_per_source_per_s", 1.0),
            max(1.0, r.positive("preauth_keys_per_source_burst", 10.0)),
        ),
        unknown_ids=Budget(
            r.positive("unknown_key_ids_per_source_per_s", 1.0),
            max(1.0, r.positive("unknown_key_ids_per_source_burst", 10.0)),
        ),
    )


def _tunnel(
    index: int, r: _Reader, base: Path, kmes: Mapping[str, KmeConfig]
) -> TunnelConfig | None:
    name = r.get("name", str, f"tunnel-{index}")
    if "name" in r.data and isinstance(name, str):
        # From here on errors name the tunnel as the operator does, not by position.
        r.where = tunnel_where(name)
    role = r.get("role", str, "", required=True)
    if role and role not in ("client", "server"):
        r.fail("role", 'must be "client" or "server"')
    listen, connect, public_ok = _addresses(r, role)
    kme = r.get("kme", str, None)
    if kme is not None and kme not in kmes:
        r.fail("kme", f"no [kme.{kme}] section")
    policy_text = r.get("policy", str, "qkd-pq-required" if kme else "pq-required")
    try:
        policy = Policy(policy_text)
    except ValueError:
        r.fail("policy", "must be qkd-pq-required, pq-required or qkd-preferred")
        policy = Policy.PQ_REQUIRED
    groups = r.get("groups", list, None)
    plan = GroupPlan(())
    if groups is not None and not all(isinstance(g, str) for g in groups):
        r.fail("groups", "must be a list of group names")
    else:
        try:
            plan = plan_groups(policy, groups, has_kme=kme is not None)
        except ValueError as exc:
            r.fail("groups" if groups else "policy", str(exc))
    allow = tuple(r.get("allow", list, []))
    for rule in allow:
        try:
            AllowRule.parse(str(rule))
        except ValueError as exc:
            r.fail("allow", str(exc))
    any_peer = r.get("allow_any_peer", bool, False)
    if role == "server" and not allow and not any_peer:
        r.fail("allow", "a server tunnel needs a peer access rule (or allow_any_peer = true)")
    flow_text = r.get("flow", str, "client-initiated")
    try:
        flow = Flow(flow_text)
    except ValueError:
        r.fail("flow", "must be client-initiated or server-initiated")
        flow = Flow.CLIENT_INITIATED
    server_name = r.get("server_name", str, None)
    if role == "client" and not server_name:
        r.fail("server_name", "a client tunnel must name the server it expects")
    config = TunnelConfig(
        name=name, role=role, listen=listen or TcpAddress("127.0.0.1", 1),
        connect=connect or TcpAddress("127.0.0.1", 1),
        cert=r.path("cert", base), key=r.path("key", base), ca=r.path("ca", base),
        allow=tuple(str(a) for a in allow), allow_any_peer=any_peer,
        policy=policy, plan=plan, kme=kme, flow=flow, server_name=server_name,
        max_connections=r.count("max_connections", 100),
        connect_timeout_s=r.positive("connect_timeout_s", 10.0),
        handshake_timeout_s=r.positive("handshake_timeout_s", 10.0),
        idle_timeout_s=r.positive("idle_timeout_s", 3600.0, allow_zero=True),
        max_lifetime_s=r.positive("max_lifetime_s", 0.0, allow_zero=True),
        allow_public_plaintext=public_ok,
        rekey_bytes=int(r.positive("rekey_bytes", float(1 << 30), allow_zero=True)),
        rekey_interval_s=r.positive("rekey_interval_s", 3600.0, allow_zero=True),
        fresh_key_update=bool(r.get("fresh_key_update", bool, True)),
        require_fresh_key_update=bool(r.get("require_fresh_key_update", bool, False)),
        fresh_key_interval_s=r.positive("fresh_key_interval_s", 600.0, allow_zero=True),
        fresh_key_bytes=int(r.positive("fresh_key_bytes", float(64 << 30), allow_zero=True)),
        proxy_protocol=bool(r.get("proxy_protocol", bool, False)),
        tls_engine=_tls_engine(r),
        accept_unechoed_key_id=bool(r.get("accept_unechoed_key_id", bool, False)),
        preauth=_preauth(r, role),
        **_admission(r),
        cert_policy=_cert_policy(r),
        mux=_mux(r),
    )  # fmt: skip
    if config.accept_unechoed_key_id and (
        role != "client" or flow is not Flow.CLIENT_INITIATED or kme is None
    ):
        r.fail(
            "accept_unechoed_key_id",
            "applies to client tunnels with a kme, in the client-initiated flow",
        )
    r.check_unknown()
    return config


def _tls_engine(r: _Reader) -> str:
    engine = str(r.get("tls_engine", str, DEFAULT_ENGINE))
    if engine not in ENGINES:
        r.fail("tls_engine", f"must be one of {', '.join(ENGINES)}")
        return DEFAULT_ENGINE
    return engine


def _mux(r: _Reader) -> MuxSettings:
    """The multiplexing keys of a tunnel (``multiplex`` and ``mux_*``)."""
    default = MuxSettings()
    pool_min = r.get("mux_pool_min", int, default.pool_min)
    if isinstance(pool_min, int) and pool_min < 0:
        r.fail("mux_pool_min", "must be 0 or more")
    settings = MuxSettings(
        enabled=bool(r.get("multiplex", bool, False)),
        max_streams=r.count("mux_max_streams", default.max_streams),
        pool_min=max(0, int(pool_min)),
        pool_max=r.count("mux_pool_max", default.pool_max),
        rotate_s=r.positive("mux_rotate_s", default.rotate_s, allow_zero=True),
        rotate_bytes=int(
            r.positive("mux_rotate_bytes", float(default.rotate_bytes), allow_zero=True)
        ),
        keepalive_s=r.positive("mux_keepalive_s", default.keepalive_s, allow_zero=True),
        idle_s=r.positive("mux_idle_s", default.idle_s),
    )
    if settings.pool_min > settings.pool_max:
        r.fail("mux_pool_min", f"must not exceed mux_pool_max ({settings.pool_max})")
    if settings.max_streams > MAX_MUX_STREAMS:
        r.fail("mux_max_streams", f"must be at most {MAX_MUX_STREAMS}")
    return settings


def _cert_policy(r: _Reader) -> CertificatePolicy:
    """The certificate-policy keys of a tunnel or a KME section (they can only tighten)."""
    floor = CertificatePolicy()
    rsa_bits = int(r.positive("cert_min_rsa_bits", floor.min_rsa_bits))
    ec_bits = int(r.positive("cert_min_ec_bits", floor.min_ec_bits))
    if rsa_bits < floor.min_rsa_bits:
        r.fail("cert_min_rsa_bits", f"must be at least {floor.min_rsa_bits}")
    if ec_bits < floor.min_ec_bits:
        r.fail("cert_min_ec_bits", f"must be at least {floor.min_ec_bits}")
    return CertificatePolicy(
        min_rsa_bits=max(rsa_bits, floor.min_rsa_bits),
        min_ec_bits=max(ec_bits, floor.min_ec_bits),
        require_key_usage=bool(r.get("cert_require_key_usage", bool, False)),
        require_eku=bool(r.get("cert_require_eku", bool, False)),
    )


ADMISSION_COUNTS = ("max_connections_per_source", "max_handshakes", "max_handshakes_per_source")
ADMISSION_SECONDS = ("handshake_rate_per_source", "first_byte_timeout_s", "hello_timeout_s")


def _admission(r: _Reader) -> dict[str, Any]:
    """The admission-control keys of a tunnel (0 turns a limit or deadline off)."""
    default: dict[str, Any] = {f.name: f.default for f in fields(TunnelConfig)}
    values: dict[str, Any] = {
        key: int(r.positive(key, default[key], allow_zero=True)) for key in ADMISSION_COUNTS
    }
    for key in ADMISSION_SECONDS:
        values[key] = r.positive(key, default[key], allow_zero=True)
    for key in ("handshake_burst_per_source", "refusal_log_interval_s"):
        values[key] = r.positive(key, default[key])
    return values


def _addresses(r: _Reader, role: str) -> tuple[Address | None, Address | None, bool]:
    listen, connect = _address(r, "listen"), _address(r, "connect")
    if isinstance(connect, TcpAddress) and connect.port == 0:
        r.fail("connect", "port 0 can only be used to listen")
    plaintext = listen if role == "client" else connect
    public_ok = bool(r.get("allow_public_plaintext", bool, False))
    if plaintext is not None and not plaintext.loopback and not public_ok:
        side = "listen" if role == "client" else "connect"
        r.fail(side, "plaintext side is not loopback or unix (set allow_public_plaintext)")
    if role == "client" and connect is not None and not isinstance(connect, TcpAddress):
        r.fail("connect", "a client tunnel connects to its peer over TCP")
    return listen, connect, public_ok


ADDRESS_HINT = '"host:port", "[v6]:port", "unix:/path" or "systemd:NAME", e.g. "127.0.0.1:8443"'


def _address(r: _Reader, key: str) -> Address | None:
    text = r.get(key, str, "", required=True, hint=ADDRESS_HINT)
    if not text:
        return None
    try:
        return parse_address(text)
    except AddressError as exc:
        r.fail(key, str(exc))
        return None
