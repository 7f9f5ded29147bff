"""Which SSH algorithms the gateway offers: modern ones only.

ssh-audit (3.x) warns about every key exchange without post-quantum
protection. Hybrid post-quantum exchanges need OpenSSH >= 9.9 on the client
(mlkem768x25519, served here through `cryptography`) or liboqs on the gateway
host (sntrup761x25519, which OpenSSH >= 8.5 clients speak). Until clients
have caught up, curve25519 stays on offer unless `post_quantum_only` is set.
"""

from __future__ import annotations

import asyncssh

POST_QUANTUM_KEX = (
    "mlkem768x25519-sha256",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
)
CLASSIC_KEX = ("curve25519-sha256", "curve25519-sha256@libssh.org")
# AES-GCM only, hardware-accelerated via `cryptography` and authenticated without a
# separate MAC. Not chacha20-poly1305: asyncssh computes it packet by packet in Python
# (about 250 MiB/s here against about 380 for AES). Not the CTR modes: OpenSSH's client
# prefers aes128-ctr with umac-64/128 to GCM whenever both are offered, and asyncssh's
# UMAC goes through ctypes buffers per packet, which cost a quarter of a scp's
# throughput; every OpenSSH since 6.2 (2013) and PuTTY since 0.76 speak GCM.
CIPHERS = (
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
)
# GCM authenticates its own packets, so no MAC is ever used; the key exchange still
# names a MAC list, and these are the ones ssh-audit accepts.
MACS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
)


def server_algorithms(post_quantum_only: bool = False) -> dict[str, list[str]]:
    """Keyword arguments for `asyncssh.listen` that pin the algorithms."""
    available = {name.decode() for name in asyncssh.kex.get_kex_algs()}
    kex = [name for name in POST_QUANTUM_KEX if name in available]
    if not post_quantum_only:
        kex += CLASSIC_KEX
    return {
        "kex_algs": kex,
        "encryption_algs": list(CIPHERS),
        "mac_algs": list(MACS),
        "compression_algs": ["none"],
    }
