"""``qkdproxy kme-check``: an ETSI GS QKD 014 conformance run against a real KME pair.

The calls and their order live here; the verdicts are pure functions in
:mod:`qkdproxy.core.etsi014.conformance`. It draws at most ``KEY_BUDGET`` keys (said before the
first call), every one of them checked and then discarded; key material is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import uuid
import warnings
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yarl
from cryptography import x509

from qkdproxy.core.etsi014.conformance import (
    KEY_BUDGET,
    Answer,
    Result,
    Verdict,
    judge_bad_size,
    judge_container,
    judge_encoded_sae,
    judge_max_per_request,
    judge_not_found,
    judge_same_keys,
    judge_single_use,
    judge_status,
    judge_unauthorised,
    percent_encode_all,
    render_table,
    result,
)
from qkdproxy.core.etsi014.models import KeyContainer, sae_path_segment
from qkdproxy.core.tls.credentials import CredentialError, Credentials, load_trust_anchors
from qkdproxy.core.tls.keyexchange import KeyApi
from qkdproxy.daemon.config import ConfigError, KmeConfig, load_config
from qkdproxy.keys.etsi014_client import IdentityCheckingConnector
from qkdproxy.keys.kme_identity import ExpectedKme
from qkdproxy.keys.sslctx import client_context

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
MAX_BODY = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Side:
    """One SAE and its KME."""

    role: str  # "master" or "slave"
    url: str
    sae: str
    credentials: Credentials
    anchors: tuple[x509.Certificate, ...]
    expected: ExpectedKme | None = None


class KeyBudget:
    """Counts keys drawn; refuses a draw that would exceed the announced limit."""

    def __init__(self, limit: int = KEY_BUDGET) -> None:
        self.limit = limit
        self.drawn = 0

    def spend(self, number: int) -> bool:
        """Reserve ``number`` keys; False (and nothing reserved) if over the limit."""
        if self.drawn + number > self.limit:
            return False
        self.drawn += number
        return True

    def settle(self, reserved: int, answer: Answer) -> None:
        """Give back a reservation the KME did not fill (it refused the request)."""
        if answer.status != 200:
            self.drawn -= reserved


class _Session:
    """One SAE's HTTPS session to its KME, answering raw :class:`Answer` objects."""

    def __init__(self, side: Side, names_checked: bool, timeout_s: float) -> None:
        context = client_context(side.credentials, side.anchors)
        if side.expected is not None:
            connector: aiohttp.TCPConnector = IdentityCheckingConnector(
                side.expected, ssl=side.expected.prepare(context)
            )
        else:
            # The identity check already failed (and was reported): judge the rest with
            # the chain still verified against the CA, the name check off.
            context.check_hostname = names_checked
            connector = aiohttp.TCPConnector(ssl=context)
        self.side = side
        self._http = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            version=aiohttp.HttpVersion11,
        )

    async def call(
        self, method: str, sae: str, call: str, *, body: Any = None, query: str = ""
    ) -> Answer:
        """One request to ``/api/v1/keys/{sae}/{call}`` (``sae`` already encoded if needed)."""
        url = yarl.URL(f"{self.side.url.rstrip('/')}/api/v1/keys/{sae}/{call}{query}", encoded=True)
        try:
            async with self._http.request(
                method, url, json=body, allow_redirects=False
            ) as response:
                payload = await response.content.read(MAX_BODY)
                return Answer(response.status, response.content_type, payload)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return Answer(0, "", f"{type(exc).__name__}: {exc}".encode()[:300])

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.close()


async def _tls_handshake(side: Side, context: ssl.SSLContext) -> str | None:
    """None if a TLS handshake with ``context`` succeeds, else why not."""
    parts = urlsplit(side.url)
    host, port = parts.hostname or "", parts.port or 443
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host), 10
        )
    except ssl.SSLCertVerificationError as exc:
        return f"TLS certificate verification failed: {exc.verify_message or exc}"
    except (OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    writer.close()
    return None


async def check_identity(side: Side) -> tuple[Result, bool]:
    """5.1: the KME proves its identity; returns the result and whether the URL host matched."""
    name, section = f"kme-identity-{side.role}", "5.1"
    problem = await _tls_handshake(side, client_context(side.credentials, side.anchors))
    if problem is None:
        host = urlsplit(side.url).hostname
        return result(name, section, Verdict.PASS, f"certificate names {host}"), True
    if side.expected is None:
        return result(
            name,
            section,
            Verdict.FAIL,
            f"{problem} (if the KME's certificate names it by CN only, set kme_identity)",
        ), False
    context = side.expected.prepare(client_context(side.credentials, side.anchors))
    chained = await _tls_handshake(side, context)
    if chained is not None:
        return result(name, section, Verdict.FAIL, chained), False
    return result(
        name,
        section,
        Verdict.WARN,
        f"the certificate does not name the URL host "
        f"({problem}); kme_identity {side.expected.describe()} is checked instead",
    ), False


async def check_tls_versions(side: Side, names_checked: bool) -> Result:
    """5.1: TLS 1.2 or newer, and nothing older."""
    accepted = {}
    for label, low, high in (
        ("1.3", ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
        ("1.2", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2),
        ("1.1 or older", ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1),
    ):
        with warnings.catch_warnings():
            # Offering TLS 1.0/1.1 is deprecated: here it is the point (it must be refused).
            warnings.simplefilter("ignore", DeprecationWarning)
            context = client_context(side.credentials, side.anchors, low)
            context.maximum_version = high
        context.check_hostname = names_checked and side.expected is None
        if high is ssl.TLSVersion.TLSv1_1:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        accepted[label] = await _tls_handshake(side, context) is None
    detail = ", ".join(f"TLS {k}: {'yes' if v else 'no'}" for k, v in accepted.items())
    name = f"tls-versions-{side.role}"
    if accepted["1.1 or older"]:
        return result(name, "5.1", Verdict.FAIL, f"{detail} (the spec requires TLS 1.2+)")
    if not (accepted["1.3"] or accepted["1.2"]):
        return result(name, "5.1", Verdict.FAIL, f"{detail}: no usable TLS version")
    return result(name, "5.1", Verdict.PASS, detail)


async def run_checks(
    master: Side, slave: Side, budget: KeyBudget | None = None, timeout_s: float = 10.0
) -> list[Result]:
    """Every check, in order; never more keys drawn than ``budget`` allows."""
    budget = budget or KeyBudget()
    results: list[Result] = []
    names = {}
    for side in (master, slave):
        identity, names[side.role] = await check_identity(side)
        results += [identity, await check_tls_versions(side, names[side.role])]
    async with AsyncExitStack() as stack:
        m = _Session(master, names["master"], timeout_s)
        s = _Session(slave, names["slave"], timeout_s)
        stack.push_async_callback(m.aclose)
        stack.push_async_callback(s.aclose)
        results += await _api_checks(m, s, budget)
    return results


async def _api_checks(m: _Session, s: _Session, budget: KeyBudget) -> list[Result]:
    master_sae, slave_sae = m.side.sae, s.side.sae
    to_slave, from_master = sae_path_segment(slave_sae), sae_path_segment(master_sae)
    status_result, status = judge_status(
        await m.call("GET", to_slave, "status"), master_sae, slave_sae
    )
    results = [status_result]
    per_request = status.max_key_per_request if status else 1
    if status is not None:
        results.append(judge_max_per_request(status))
    answer = await s.call("GET", from_master, "status")
    results.append(
        result("status-from-slave", "5.2", Verdict.PASS, "the slave may read status")
        if answer.status == 200
        else result(
            "status-from-slave",
            "5.2",
            Verdict.WARN,
            f"status for the slave answered "
            f"{answer.describe()} (qkdproxy then asks for one key per request)",
        )
    )
    encoded = await m.call("GET", percent_encode_all(slave_sae), "status")
    results.append(judge_encoded_sae(encoded, slave_sae))

    async def draw(check: str, number: int, via_get: bool) -> KeyContainer | None:
        if not budget.spend(number):
            results.append(result(check, "5.3", Verdict.SKIP, "key budget spent"))
            return None
        answer = (
            await m.call("GET", to_slave, "enc_keys", query=f"?number={number}&size=256")
            if via_get
            else await m.call("POST", to_slave, "enc_keys", body={"number": number, "size": 256})
        )
        budget.settle(number, answer)
        verdict, container = judge_container(check, "5.3, 6.2, 6.3", answer, number)
        results.append(verdict)
        return container

    def dec_body(keys: KeyContainer) -> dict[str, Any]:
        return {"key_IDs": [{"key_ID": k.key_id} for k in keys.keys]}

    if (posted := await draw("enc-keys-post", 1, via_get=False)) is not None:
        answer = await s.call("POST", from_master, "dec_keys", body=dec_body(posted))
        results.append(judge_same_keys("dec-keys-post", "5.4, 6.4", answer, posted))
        again = await s.call("POST", from_master, "dec_keys", body=dec_body(posted))
        results.append(judge_single_use(again))
    if (got := await draw("enc-keys-get", 1, via_get=True)) is not None:
        query = f"?key_ID={got.keys[0].key_id}"
        answer = await s.call("GET", from_master, "dec_keys", query=query)
        results.append(judge_same_keys("dec-keys-get", "5.4", answer, got))
    if per_request < 2:
        results.append(
            result("several-keys-per-request", "5.3, 5.4", Verdict.SKIP, "max_key_per_request is 1")
        )
    elif (pair := await draw("enc-keys-several", 2, via_get=False)) is not None:
        answer = await s.call("POST", from_master, "dec_keys", body=dec_body(pair))
        results.append(judge_same_keys("several-keys-per-request", "5.4", answer, pair))
    unknown = {"key_IDs": [{"key_ID": str(uuid.uuid4())}]}
    results.append(
        judge_not_found(
            "unknown-key", "5.4", await s.call("POST", from_master, "dec_keys", body=unknown)
        )
    )
    if (victim := await draw("unauthorised-setup", 1, via_get=False)) is not None:
        results.pop()  # the draw itself was checked above already
        answer = await m.call("POST", from_master, "dec_keys", body=dec_body(victim))
        results.append(judge_unauthorised(answer))
        await s.call("POST", from_master, "dec_keys", body=dec_body(victim))  # used up
    if budget.spend(1):
        bad = await m.call("GET", to_slave, "enc_keys", query="?number=1&size=255")
        budget.settle(1, bad)
        results.append(judge_bad_size(bad))
    return results


# ------------------------------------------------------------------------------- CLI


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kme-check`` on the top-level parser."""
    check = commands.add_parser(
        "kme-check",
        help="ETSI 014 conformance run against a KME pair (draws a few keys)",
        description=f"Checks a KME pair against ETSI GS QKD 014: TLS and identity, status, "
        f"enc_keys/dec_keys with GET and POST, max_key_per_request, error codes, SAE id "
        f"encoding, single use. Draws at most {KEY_BUDGET} keys. Either --config (a daemon "
        "configuration with the master's [kme] section; the slave's from the same file or "
        "--peer-config) or the --master-*/--slave-* options.",
    )
    check.add_argument("--config", type=Path, help="daemon TOML with the master SAE's [kme]")
    check.add_argument("--kme", help="its [kme.NAME] (default: the first ETSI 014 one)")
    check.add_argument("--peer-config", type=Path, help="daemon TOML with the slave's [kme]")
    check.add_argument("--peer-kme", help="its [kme.NAME] (default: sae_id = our peer_sae_id)")
    for role in ("master", "slave"):
        check.add_argument(f"--{role}-url", help=f"{role} KME https:// URL")
        check.add_argument(f"--{role}-sae", help=f"{role} SAE id")
        check.add_argument(f"--{role}-cert", type=Path, help=f"{role} SAE certificate")
        check.add_argument(f"--{role}-key", type=Path, help=f"{role} SAE private key")
        check.add_argument(
            f"--{role}-kme-identity",
            action="append",
            default=[],
            help="what the KME certificate must carry instead of the URL host (cn:/dns:/uri:)",
        )
    check.add_argument("--ca", type=Path, help="CA bundle of the KME certificates")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(handler=kme_check_command)


def _side_from_config(role: str, kme: KmeConfig) -> Side:
    expected = ExpectedKme.parse(kme.kme_identity) if kme.kme_identity else None
    return Side(
        role,
        kme.endpoint,
        kme.sae_id,
        Credentials.load(kme.cert, kme.key),
        tuple(load_trust_anchors(kme.ca)),
        expected,
    )


def _pick(kmes: dict[str, KmeConfig], name: str | None, sae: str | None, what: str) -> KmeConfig:
    candidates = [
        k
        for k in kmes.values()
        if k.api is KeyApi.ETSI_014 and name in (None, k.name) and sae in (None, k.sae_id)
    ]
    if not candidates:
        raise ValueError(f"no ETSI 014 [kme] section for the {what}")
    return candidates[0]


def sides_from_args(args: argparse.Namespace) -> tuple[Side, Side]:
    """The master and slave sides from --config or from the --master-*/--slave-* options."""
    if args.config is not None:
        master = _pick(load_config(args.config).kmes, args.kme, None, "master")
        peer_kmes = load_config(args.peer_config or args.config).kmes
        slave = _pick(
            peer_kmes, args.peer_kme, master.peer_sae_id, f"slave SAE {master.peer_sae_id!r}"
        )
        return _side_from_config("master", master), _side_from_config("slave", slave)
    missing = [
        f"--{role}-{what}"
        for role in ("master", "slave")
        for what in ("url", "sae", "cert", "key")
        if getattr(args, f"{role}_{what}") is None
    ]
    if missing or args.ca is None:
        raise ValueError(f"give --config, or all of: {', '.join([*missing, '--ca'][:5])} ...")
    anchors = tuple(load_trust_anchors(args.ca))
    sides = []
    for role in ("master", "slave"):
        rules = getattr(args, f"{role}_kme_identity")
        sides.append(
            Side(
                role,
                getattr(args, f"{role}_url"),
                getattr(args, f"{role}_sae"),
                Credentials.load(getattr(args, f"{role}_cert"), getattr(args, f"{role}_key")),
                anchors,
                ExpectedKme.parse(rules) if rules else None,
            )
        )
    return sides[0], sides[1]


def kme_check_command(args: argparse.Namespace) -> int:
    """Run the checks; exit 0 if nothing failed, 1 if something did, 2 on bad usage."""
    try:
        master, slave = sides_from_args(args)
    except (ConfigError, CredentialError, ValueError, OSError) as exc:
        print(f"qkdproxy kme-check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    budget = KeyBudget()
    print(
        f"kme-check: master SAE {master.sae!r} at {master.url}, slave SAE {slave.sae!r} at "
        f"{slave.url}; draws at most {budget.limit} keys from this KME pair",
        file=sys.stderr if args.json else sys.stdout,
        flush=True,
    )
    results = asyncio.run(run_checks(master, slave, budget))
    ok = all(r.verdict is not Verdict.FAIL for r in results)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": ok,
                    "key_budget": budget.limit,
                    "keys_drawn": budget.drawn,
                    "checks": [r.to_json() for r in results],
                }
            )
        )
    else:
        print(render_table(results))
        print(f"keys drawn: {budget.drawn} of at most {budget.limit}")
    return EXIT_OK if ok else EXIT_FAIL


def verdicts(results: Sequence[Result]) -> dict[str, Verdict]:
    """Check name -> verdict (tests and callers)."""
    return {r.check: r.verdict for r in results}
