"""``fedscan certs``: a development PKI for a TLS SuperLink and authenticated SuperNodes.

Writes what the runbook (docs/how-to/coordinate.md, step 2) needs and nothing else:

- ``ca.crt`` / ``ca.key``: a private certificate authority. Hospitals get
  ``ca.crt`` only, to check that they talk to the real SuperLink.
- ``superlink.crt`` / ``superlink.key``: the SuperLink's TLS certificate, valid
  for the host names and IP addresses it will be reached at (gRPC checks them).
- ``sites/<name>/<name>.key`` / ``.pub``: one ECDSA P-384 key pair per site in
  OpenSSH format, the format ``flower-supernode --auth-supernode-private-key``
  and ``flwr supernode register`` read. The private key never leaves its site;
  the coordinator registers the ``.pub``.

For production, a hospital's own CA and key management replace this; the file
names and flags stay the same.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedscan.common.core.errors import ConfigError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
VALID_DAYS = 365


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedscan development federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def make_dev_pki(out: Path, *, sites: Sequence[str], hosts: Sequence[str]) -> dict[str, Path]:
    """Create the CA, the SuperLink certificate and one auth key pair per site under ``out``.

    Refuses to overwrite an existing CA: re-running would silently invalidate
    every certificate and registration already handed out.
    """
    if not sites:
        raise ConfigError("--site", "name at least one site")
    bad = [s for s in sites if not SITE_NAME.match(s)]
    if bad or len(set(sites)) != len(sites):
        raise ConfigError(
            "--site", f"names must be unique, letters/digits/._- only: {bad or sites}"
        )
    if not hosts:
        raise ConfigError("--host", "name at least one host name or IP of the SuperLink")
    out = Path(out)
    if (out / "ca.crt").exists():
        raise ConfigError("--out", f"{out} already holds a CA (ca.crt); use a new folder")
    now = dt.datetime.now(dt.UTC)
    until = now + dt.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedscan development CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .sign(ca_key, hashes.SHA384())
    )
    link_key = ec.generate_private_key(ec.SECP384R1())
    link = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(link_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    files = {
        "ca_cert": out / "ca.crt",
        "ca_key": out / "ca.key",
        "superlink_cert": out / "superlink.crt",
        "superlink_key": out / "superlink.key",
    }
    _write(files["ca_cert"], ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files["ca_key"], _pem_key(ca_key), private=True)
    _write(files["superlink_cert"], link.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files["superlink_key"], _pem_key(link_key), private=True)
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        files[f"{site}_key"] = out / "sites" / site / f"{site}.key"
        files[f"{site}_pub"] = out / "sites" / site / f"{site}.pub"
        _write(files[f"{site}_key"], private, private=True)
        _write(files[f"{site}_pub"], public + f" fedscan-{site}\n".encode(), private=False)
    return files
