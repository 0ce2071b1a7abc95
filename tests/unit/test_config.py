"""Configuration, addresses and key-exchange policies: validated up front, clear messages."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdproxy.core.addresses import (
    AddressError,
    SystemdAddress,
    TcpAddress,
    UnixAddress,
    parse_address,
)
from qkdproxy.core.policy import Policy, plan_groups
from qkdproxy.core.tls.keyexchange import Flow, KeyApi
from qkdproxy.daemon.config import ConfigError, load_config

KME = """
[kme.local]
api = "014"
url = "https://127.0.0.1:8014"
sae_id = "sae-a"
peer_sae_id = "sae-b"
cert = "pki/sae-a.pem"
key = "pki/sae-a-key.pem"
ca = "pki/ca.pem"
"""

CLIENT = """
[[tunnel]]
name = "web"
role = "client"
listen = "127.0.0.1:8443"
connect = "127.0.0.1:9443"
server_name = "server.qkdproxy.test"
cert = "pki/c.pem"
key = "pki/c-key.pem"
ca = "pki/ca.pem"
kme = "local"
"""

SERVER = """
[[tunnel]]
name = "backend"
role = "server"
listen = "0.0.0.0:9443"
connect = "127.0.0.1:9000"
cert = "pki/s.pem"
key = "pki/s-key.pem"
ca = "pki/ca.pem"
allow = ["uri:spiffe://qkdproxy.test/tunnel/client"]
kme = "local"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qkdproxy.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.problems


def test_a_good_file_loads_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, KME + CLIENT + SERVER))
    client, server = config.tunnels
    assert client.policy is Policy.QKD_PQ_REQUIRED
    assert [g.name for g in client.plan.groups] == ["qkd_mlkem768"]
    assert client.flow is Flow.CLIENT_INITIATED
    assert client.cert == tmp_path / "pki/c.pem"
    assert (client.max_connections, client.connect_timeout_s) == (100, 10.0)
    assert config.kmes["local"].api is KeyApi.ETSI_014
    assert server.listen == TcpAddress("0.0.0.0", 9443)
    assert config.daemon.drain_timeout_s == 300


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (KME + CLIENT.replace('name = "web"', 'name = "web"\nbogus = 1'), "tunnel.web.bogus: unknown key"),
        (KME + CLIENT + "[extra]\n", "extra: unknown section"),
        (KME + CLIENT.replace('role = "client"', 'role = "both"'), "tunnel.web.role: must be"),
        (KME + CLIENT.replace("127.0.0.1:8443", "0.0.0.0:8443"), "tunnel.web.listen: plaintext side"),
        (KME + SERVER.replace("127.0.0.1:9000", "10.0.0.5:9000"), "tunnel.backend.connect: plaintext side"),
        (KME + SERVER.replace('allow = ["uri:spiffe://qkdproxy.test/tunnel/client"]', ""), "needs a peer access rule"),
        (KME + CLIENT.replace('server_name = "server.qkdproxy.test"', ""), "server_name"),
        (KME + CLIENT.replace("127.0.0.1:9443", "127.0.0.1:99999"), "port must be"),
        (KME + CLIENT.replace("127.0.0.1:9443", "::1:9443"), "write IPv6 addresses as [addr]:port"),
        (KME + CLIENT.replace("127.0.0.1:9443", "127.0.0.1:0"), "port 0 can only be used to listen"),
        (KME + CLIENT.replace('kme = "local"', 'kme = "other"'), "no [kme.other] section"),
        (CLIENT.replace('kme = "local"', 'policy = "qkd-pq-required"'), "needs a kme"),
        (KME + CLIENT + 'groups = ["qkd_mlkem768", "X25519MLKEM768"]\n', "never downgrades"),
        (KME + CLIENT + 'policy = "qkd-preferred"\ngroups = ["qkd_mlkem768"]\n', "fallback"),
        (KME + CLIENT + 'groups = ["qkd_nope"]\n', "unknown group"),
        (KME + CLIENT + "max_connections = -1\n", "max_connections: must be a positive integer"),
        (KME + CLIENT + 'idle_timeout_s = "soon"\n', 'idle_timeout_s: must be a number, not the string "soon"'),
        (KME.replace("https://", "http://") + CLIENT, "must be an https:// URL"),
        (KME.replace("https://", "https://kme:secret@") + CLIENT, "url: must not carry a user name or password"),
        (KME + CLIENT + 'flow = "sideways"\n', "tunnel.web.flow"),
        (KME + CLIENT + CLIENT, "used twice"),
        ("[daemon]\n", "at least one [[tunnel]]"),
        ("not toml = = =", "not valid TOML"),
    ],
)  # fmt: skip
def test_problems_name_the_file_and_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    found = problems(tmp_path, text)
    assert any(fragment in p for p in found), found
    assert all(p.startswith(str(tmp_path / "qkdproxy.toml")) for p in found)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = KME + CLIENT.replace('role = "client"', 'role = "x"').replace(
        "127.0.0.1:9443", "nowhere"
    )
    assert len(problems(tmp_path, text)) >= 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "absent.toml")


def test_public_plaintext_needs_an_explicit_opt_in(tmp_path: Path) -> None:
    text = (
        KME + CLIENT.replace("127.0.0.1:8443", "0.0.0.0:8443") + "allow_public_plaintext = true\n"
    )
    assert load_config(write(tmp_path, text)).tunnels[0].allow_public_plaintext


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:80", TcpAddress("127.0.0.1", 80)),
        ("[::1]:443", TcpAddress("::1", 443)),
        ("localhost:1", TcpAddress("localhost", 1)),
        ("unix:/run/qkdproxy.sock", UnixAddress("/run/qkdproxy.sock")),
        ("systemd:plain", SystemdAddress("plain")),
    ],
)
def test_addresses(text: str, address: object) -> None:
    assert parse_address(text) == address
    assert str(parse_address(text)) == text


def test_loopback_detection() -> None:
    assert TcpAddress("127.0.0.2", 1).loopback and TcpAddress("::1", 1).loopback
    assert not TcpAddress("0.0.0.0", 1).loopback and not TcpAddress("example.org", 1).loopback
    assert UnixAddress("/x").loopback


@given(st.text(max_size=40))
def test_address_parser_only_raises_address_error(text: str) -> None:
    with contextlib.suppress(AddressError):
        parse_address(text)


def test_policies() -> None:
    assert [g.name for g in plan_groups(Policy.PQ_REQUIRED, None, has_kme=False).groups] == [
        "X25519MLKEM768"
    ]
    preferred = plan_groups(Policy.QKD_PREFERRED, None, has_kme=True)
    assert [g.name for g in preferred.groups] == ["qkd_mlkem768", "X25519MLKEM768"]
    assert [g.name for g in preferred.fallback] == ["X25519MLKEM768"]
    with pytest.raises(ValueError, match="post-quantum"):
        plan_groups(Policy.PQ_REQUIRED, ["x25519"], has_kme=False)
    with pytest.raises(ValueError, match="QKD groups need a kme"):
        plan_groups(Policy.PQ_REQUIRED, ["qkd_mlkem768"], has_kme=False)
    with pytest.raises(ValueError, match="post-quantum fallback"):
        plan_groups(Policy.QKD_PREFERRED, ["qkd_mlkem768", "x25519"], has_kme=True)


@pytest.mark.parametrize(
    ("value", "problem"),
    [("-1", "must be positive"), ("1001", "at most 1000"), ('"x"', "log_flush_ms"),
     ("nan", "finite")],
)  # fmt: skip
def test_log_flush_ms_is_checked(tmp_path: Path, value: str, problem: str) -> None:
    found = problems(tmp_path, f"[daemon]\nlog_flush_ms = {value}\n" + KME + CLIENT + SERVER)
    assert any("log_flush_ms" in p and problem in p for p in found), found


def test_log_flush_ms_defaults_to_20_and_0_turns_it_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, KME + CLIENT + SERVER)).daemon.log_flush_ms == 20
    off = load_config(write(tmp_path, "[daemon]\nlog_flush_ms = 0\n" + KME + CLIENT + SERVER))
    assert off.daemon.log_flush_ms == 0
