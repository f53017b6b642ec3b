"""Key material for the test control plane: a self-signed CA, serving and client certificates, and the
service-account signing key.

This module only writes PEM files with the `cryptography` package. It does not start anything and
knows nothing about which component uses which file; `cluster.py` wires them to flags.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=7)
_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Everything the control plane needs, as files under one directory."""

    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    """Client certificate in group system:masters (cluster-admin)."""
    clients: dict[str, CertPair] = field(default_factory=dict)
    """Client certificates by component: controller-manager, scheduler, kwok."""
    service_account_key: Path = Path()
    """RSA private key that signs service-account tokens."""
    service_account_pub: Path = Path()
    """Its public key, for the apiserver to verify tokens."""
    kubelet_serving: CertPair | None = None
    """The real node's kubelet serving certificate (only with a real node)."""


# Client identities. The RBAC bootstrap policy grants system:kube-controller-manager and
# system:kube-scheduler the rights those components need; kwok stands in for every kubelet, so it
# gets cluster-admin rather than one node identity per fake node.
CLIENT_SUBJECTS: dict[str, tuple[str, str | None]] = {
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "kwok": ("kwok-controller", "system:masters"),
}


# With a real node: its kubelet (Node authorizer identity), kube-proxy and CoreDNS (bootstrap RBAC
# covers system:kube-proxy; CoreDNS gets a ClusterRole from node.py), and the apiserver's client
# certificate for kubelets (logs, exec, port-forward).
NODE_CLIENT_SUBJECTS: dict[str, tuple[str, str | None]] = {
    "kube-proxy": ("system:kube-proxy", None),
    "coredns": ("system:coredns", None),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
}


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _write_key(key: _PrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_pair(cert: x509.Certificate, key: _PrivateKey, directory: Path, stem: str) -> CertPair:
    pair = CertPair(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )


def _make_ca(directory: Path) -> tuple[CertPair, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = _name("moeserve-test-ca")
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _write_pair(cert, key, directory, "ca"), cert, key


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    builder = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _apiserver_sans(service_ip: str, extra_ips: tuple[str, ...] = ()) -> list[x509.GeneralName]:
    names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    ips = ["127.0.0.1", service_ip, *extra_ips]
    return [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]


def _write_service_account_keys(directory: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = directory / "sa.key", directory / "sa.pub"
    _write_key(key, private)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def create_pki(directory: Path, service_ip: str, node: tuple[str, str] | None = None) -> Pki:
    """Write a fresh CA, the apiserver serving pair, client pairs and the service-account key pair.

    `service_ip` is the first address of the service CIDR (the in-cluster `kubernetes` Service).
    `node` is (name, ip) of a real node: the apiserver then also serves on that IP, and the node's
    kubelet, kube-proxy and CoreDNS get their certificates.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_cert, ca_key = _make_ca(directory)
    serving, serving_key = _issue(
        ca_cert,
        ca_key,
        _name("kube-apiserver"),
        ExtendedKeyUsageOID.SERVER_AUTH,
        _apiserver_sans(service_ip, (node[1],) if node else ()),
    )
    apiserver = _write_pair(serving, serving_key, directory, "apiserver")
    subjects = dict(CLIENT_SUBJECTS)
    kubelet_serving = None
    if node:
        subjects.update(NODE_CLIENT_SUBJECTS)
        subjects["kubelet"] = (f"system:node:{node[0]}", "system:nodes")
        cert, key = _issue(
            ca_cert,
            ca_key,
            _name(f"system:node:{node[0]}", "system:nodes"),
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName(node[0]), x509.IPAddress(ipaddress.ip_address(node[1]))],
        )
        kubelet_serving = _write_pair(cert, key, directory, "kubelet-serving")
    clients = {}
    for component, (common_name, organization) in subjects.items():
        cert, key = _issue(ca_cert, ca_key, _name(common_name, organization), ExtendedKeyUsageOID.CLIENT_AUTH)
        clients[component] = _write_pair(cert, key, directory, f"client-{component}")
    sa_key, sa_pub = _write_service_account_keys(directory)
    return Pki(
        ca=ca,
        apiserver=apiserver,
        admin=clients["admin"],
        clients=clients,
        service_account_key=sa_key,
        service_account_pub=sa_pub,
        kubelet_serving=kubelet_serving,
    )
