"""Per-sandbox TLS credentials for agents the service reaches over the network (pods).

Each sandbox gets two self-signed EC P-256 pairs: the agent's, whose certificate
the service pins (the only one it trusts for that sandbox), and the service's
client pair for that sandbox, whose certificate is the only one the agent admits.
Nothing is shared between sandboxes, so one sandbox's credentials open no other.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..agent.remote import TlsEndpoint

__all__ = ["SandboxCredentials", "TlsEndpoint"]

VALIDITY = datetime.timedelta(days=3650)  # the pin, not the dates, is what is checked
CLOCK_SKEW = datetime.timedelta(days=1)  # a node whose clock is behind still accepts them


@dataclass(frozen=True)
class SandboxCredentials:
    """The PEM pairs of one sandbox: the agent's and the service's (bytes each)."""

    agent_cert: bytes
    agent_key: bytes
    service_cert: bytes
    service_key: bytes

    @classmethod
    def generate(cls, sandbox_id: str) -> SandboxCredentials:
        """Fresh pairs for `sandbox_id` (named in the certificates' common names)."""
        agent_cert, agent_key = _self_signed(f"{sandbox_id} agent", ExtendedKeyUsageOID.SERVER_AUTH)
        service_cert, service_key = _self_signed(
            f"{sandbox_id} service", ExtendedKeyUsageOID.CLIENT_AUTH
        )
        return cls(agent_cert, agent_key, service_cert, service_key)

    def endpoint(self, host: str, port: int) -> TlsEndpoint:
        """How the service reaches this sandbox's agent listening at `host`:`port`."""
        return TlsEndpoint(host, port, self.agent_cert, self.service_cert, self.service_key)

    def __repr__(self) -> str:  # never the keys, wherever an object gets printed
        return "SandboxCredentials(<PEM pairs>)"


def _self_signed(common_name: str, usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
    """A self-signed certificate for `usage` and its private key, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem
