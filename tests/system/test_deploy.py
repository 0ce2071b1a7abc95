"""Deployment files: systemd units verify, manifests validate, configurations load."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from qkdproxy.cli.kme import CONFIG_KEYS
from qkdproxy.daemon.app import build_endpoint
from qkdproxy.daemon.config import load_config
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.sources import KeySources
from qkdproxy.tools.certs import write_dev_pki

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
MANIFESTS = sorted((ROOT / "deploy/kubernetes").glob("*.yaml"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
requires_systemd = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package: systemd)"
)
KUBERNETES_VERSION = "1.33"


def units_with_existing_binary(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart names a binary that exists here."""
    qkdproxy = shutil.which("qkdproxy") or str(ROOT / ".venv/bin/qkdproxy")
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/usr/local/bin/qkdproxy", qkdproxy)
        (tmp_path / unit.name).write_text(text)
    shutil.copy(tmp_path / "qkdproxy@.service", tmp_path / "qkdproxy@demo.service")
    return tmp_path


@requires_systemd
def test_units_verify(tmp_path: Path) -> None:
    units = units_with_existing_binary(tmp_path)
    names = [
        "qkdproxy.service", "qkdproxy@demo.service", "qkdproxy-plain.socket",
        "qkdproxy-tls.socket",
    ]  # fmt: skip
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", *names], cwd=units, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "qkdproxy" not in result.stderr, result.stderr


@requires_systemd
@pytest.mark.parametrize("unit", ["qkdproxy.service", "qkdproxy@demo.service"])
def test_units_are_hardened(tmp_path: Path, unit: str) -> None:
    units = units_with_existing_binary(tmp_path)
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "security", "--offline=yes", unit], cwd=units,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5, result.stdout


def test_units_say_what_the_daemon_needs() -> None:
    service = (UNITS / "qkdproxy.service").read_text()
    for line in (
        "Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "User=qkdproxy",
        "ProtectSystem=strict", "PrivateTmp=yes", "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service",
        "ReadOnlyPaths=/etc/qkdproxy", "RestartPreventExitStatus=2",
    ):  # fmt: skip
        assert line in service, line
    for unit in ("qkdproxy.service", "qkdproxy@.service"):
        text = (UNITS / unit).read_text()
        # Copies made at start would make a reload re-read the old files.
        assert not re.search(r"^(LoadCredential|DynamicUser)=", text, re.MULTILINE)
        # The header says how to rotate, and it is true (tests/system/test_operator_rotation.py).
        assert "systemctl reload" in text.split("[Unit]")[0]
        assert "kme-ca.pem" in text.split("[Unit]")[0]
        documentation = re.search(r"^Documentation=(\S+)", text, re.MULTILINE)
        assert documentation and "systemd" not in documentation[1]
    assert "u qkdproxy" in (UNITS / "qkdproxy-sysusers.conf").read_text()
    socket = (UNITS / "qkdproxy-plain.socket").read_text()
    assert "FileDescriptorName=plain" in socket


def manifests() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schema(path: Path) -> None:
    # The validator (with its schemas, about 100 MB) is the `k8s` extra; CI installs it.
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install -e '.[k8s]')"
    )
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def sidecars() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    out = []
    for doc in manifests():
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]
            for container in spec["spec"].get("initContainers", []):
                out.append((spec, container))
    return out


def test_qkdproxy_runs_as_a_native_sidecar_with_probes_and_scraping() -> None:
    found = sidecars()
    assert len(found) == 2
    for template, sidecar in found:
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert sidecar["resources"]["requests"]
        assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
        assert any(m["mountPath"] == "/tmp" for m in sidecar["volumeMounts"])
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    assert {("Deployment", "kme-simulator"), ("Service", "kme-a"), ("Service", "kme-b")} <= kinds
    assert ("Secret", "qkdproxy-pki") in kinds


def test_the_embedded_configurations_load(tmp_path: Path) -> None:
    """The TOML inside the ConfigMaps is valid, and its certificates exist in a PKI written
    by `qkdproxy certs` (the Secret is created from that directory)."""
    write_dev_pki(tmp_path / "pki")
    checked = 0
    for doc in manifests():
        if doc["kind"] != "ConfigMap":
            continue
        for name, text in doc["data"].items():
            path = tmp_path / f"{doc['metadata']['name']}-{name}"
            path.write_text(text)
            if name == "kme-sim.toml":
                table = tomllib.loads(text)["simulator"]
                assert set(table) <= set(CONFIG_KEYS)
            else:
                config = load_config(path)
                for tunnel in config.tunnels:
                    build_endpoint(tunnel, KeyContext(KeySources()), tunnel.plan.groups)
                assert config.daemon.status_listen is not None
            checked += 1
    assert checked == 3


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) == 2 and all("slim" in s for s in stages)
    assert re.search(r"^USER 10001", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert "EXPOSE" in text and "VOLUME" in text
    assert "curl" not in text and "wget" not in text  # only the package registries


def embedded_configs() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment template spec, parsed qkdproxy.toml of its ConfigMap) per workload."""
    maps = {d["metadata"]["name"]: d["data"] for d in manifests() if d["kind"] == "ConfigMap"}
    out = []
    for template, _sidecar in sidecars():
        volume = next(v for v in template["spec"]["volumes"] if "configMap" in v)
        out.append(
            (template["spec"], tomllib.loads(maps[volume["configMap"]["name"]]["qkdproxy.toml"]))
        )
    assert out
    return out


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


def test_pods_outlive_the_drain_and_request_the_memory_the_daemon_uses() -> None:
    for spec, config in embedded_configs():
        drain = config.get("daemon", {}).get("drain_timeout_s", 300)
        # A pod killed before the drain ends cuts live connections.
        assert spec["terminationGracePeriodSeconds"] >= drain + 10
    for _, sidecar in sidecars():
        # Measured: 65 MB idle, 80-94 MB under load here, 111-117 MB in the run.
        assert mebibytes(sidecar["resources"]["requests"]["memory"]) >= 117
        assert mebibytes(sidecar["resources"]["limits"]["memory"]) >= 2 * 117


def shipped_configs() -> list[dict[str, Any]]:
    configs = [config for _, config in embedded_configs()]
    configs += [
        tomllib.loads((ROOT / f"etc/qkdproxy-{r}.toml").read_text()) for r in ("client", "server")
    ]
    return configs


def test_the_kme_ca_is_kept_apart_from_the_tunnel_ca() -> None:
    for config in shipped_configs():
        tunnel_cas = {Path(t["ca"]).name for t in config["tunnel"]}
        for kme in config["kme"].values():
            assert Path(kme["ca"]).name == "kme-ca.pem"
            assert Path(kme["ca"]).name not in tunnel_cas
    secret = next(d for d in manifests() if d["kind"] == "Secret")
    assert "kme-ca.pem" in secret["stringData"]


def test_the_image_healthcheck_matches_the_configured_status_port() -> None:
    text = (ROOT / "Dockerfile").read_text()
    default = re.search(r"^\s+QKDPROXY_STATUS_PORT=(\d+)$", text, re.MULTILINE)  # ENV
    assert default and "QKDPROXY_STATUS_PORT" in text.split("HEALTHCHECK", 1)[1]
    exposed = re.search(r"^EXPOSE (.*)$", text, re.MULTILINE)
    assert exposed and default[1] in exposed[1].split()
    for _spec, config in embedded_configs():
        assert config["status"]["listen"].endswith(f":{default[1]}")
    for doc in manifests():
        if doc["kind"] == "Deployment" and "annotations" in doc["spec"]["template"]["metadata"]:
            assert (
                doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
                == default[1]
            )
    # Containers: what a plaintext listener outside loopback needs is said where it matters.
    assert "allow_public_plaintext" in text
    operations = (ROOT / "docs/OPERATIONS.md").read_text()
    assert "allow_public_plaintext" in operations
    # Build and load the image before applying the manifests that use it.
    kubernetes = operations.split("### On Kubernetes", 1)[1]
    assert (
        kubernetes.index("docker build")
        < kubernetes.index("load docker-image")
        < kubernetes.index("kubectl apply")
    )
