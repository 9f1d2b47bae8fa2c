"""Test certificates (trustme): a CA of the suite's own, server certificates from it, and the
client contexts that trust it."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Certs:
    ca: trustme.CA
    cert: Path          # the server's certificate chain (PEM)
    key: Path           # its private key (PEM)
    ca_file: Path       # the CA certificate, for clients that verify

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def config(self) -> str:
        return f'[tls]\ncertificate = "{self.cert}"\nkey = "{self.key}"\n'


def make_certs(directory: Path, *names: str) -> Certs:
    """A new CA and a certificate for `names` (default: the test host's name and 127.0.0.1)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert(*(names or ("mail.example.test", "127.0.0.1", "localhost")))
    cert, key, ca_file = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    with open(cert, "wb") as f:
        for blob in issued.cert_chain_pems:
            f.write(blob.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, cert, key, ca_file)
