"""Private digests: keys that identify a secret-bearing value without keeping it in memory.

Caches keyed by a request must tell one user's request from another's, so the key has to
depend on the credentials the request carries (``Authorization``, cookies, basic auth, a
``user:pass@`` in the URL, an ``api_key`` in the query). Keeping those raw in a dictionary key
would leave them readable in a heap dump or a debugger for as long as the entry lives. So such
keys are a keyed BLAKE2b digest of their parts instead, with a secret drawn from
``os.urandom`` per process (a forked child draws its own): equal parts give equal keys within
one process, and a key says nothing about its parts to anyone without the secret.

128-bit digests: a collision between two live keys is not a practical concern.
"""

from __future__ import annotations

import hashlib
import os
from typing import Final

from otel_raptor.runtime.forksafe import after_fork_in_child

__all__ = ["DIGEST_SIZE", "private_digest"]

#: Bytes in a digest.
DIGEST_SIZE: Final = 16


class _Secret:
    __slots__ = ("__weakref__", "key")

    def __init__(self) -> None:
        self.key = os.urandom(32)


def _redraw(secret: _Secret) -> None:
    secret.key = os.urandom(32)


_secret = _Secret()
after_fork_in_child(_secret, _redraw)


def private_digest(*parts: object) -> bytes:
    """A :data:`DIGEST_SIZE`-byte digest of ``parts`` (``bytes`` and ``str`` as they are,
    anything else by its ``repr``), keyed with this process's secret. Each part is tagged
    with its kind and length, so ``("a", "b")``, ``("ab",)`` and ``(b"a", "b")`` differ."""
    digest = hashlib.blake2b(key=_secret.key, digest_size=DIGEST_SIZE)
    for part in parts:
        if isinstance(part, bytes):
            tag, data = b"b", part
        elif isinstance(part, str):
            tag, data = b"s", part.encode("utf-8", "surrogatepass")
        else:
            tag, data = b"r", repr(part).encode("utf-8", "backslashreplace")
        digest.update(tag + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()
