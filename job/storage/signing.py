"""The key that signs what this project writes for Ray Tune, and the signed envelope of one file.

Ray Tune pickles its state into the sweep's storage and unpickles it on a resume: bytes that anyone who can
write the bucket prefix could have planted. Every file Tune writes there is wrapped in an envelope carrying an
HMAC-SHA256 of its bytes under a key only this project's processes hold, and nothing is handed back to Tune
before its HMAC checks. Why: docs/operations.md#what-storage-is-trusted-with
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from gan.data import cache_root
from job.errors import UsageError

SIGNING_KEY_ENV = "GAN_JOB_SIGNING_KEY"  # from a Kubernetes Secret on a cluster
KEY_FROM_ENV = "env"  # a key source: the variable above, read where the key is needed
KEY_FILE_NAME = "signing.key"  # the local default, made on first use, mode 0600
MIN_KEY_CHARS = 32  # `openssl rand -hex 32` gives 64
MAGIC = b"gan-job signed v1 hmac-sha256 "  # then 64 hex digits and a newline, then the file's bytes
HEADER_LEN = len(MAGIC) + 64 + 1


class SignatureError(UsageError):
    """Bytes that do not carry this project's signature: never unpickled, refused in one line."""


def default_key_file() -> Path:
    """The local cluster's key: `$XDG_CACHE_HOME/gan-job/signing.key`."""
    return cache_root() / KEY_FILE_NAME


def key_source(create: bool = True) -> str:
    """Where the signing key comes from: KEY_FROM_ENV when GAN_JOB_SIGNING_KEY is set, else the local key file
    (made now if there is none and `create`). A source names the key without holding it, so it may travel to
    Ray's processes in a pickled filesystem."""
    if os.environ.get(SIGNING_KEY_ENV, "").strip():
        return KEY_FROM_ENV
    path = default_key_file()
    if not create:
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return str(path)  # made earlier (or by a concurrent command): load_key checks it
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return str(path)


def load_key(source: str) -> bytes:
    """The key a `key_source()` names; UsageError (one line) when it is missing, short or readable by others."""
    if source == KEY_FROM_ENV:
        raw = os.environ.get(SIGNING_KEY_ENV, "").strip()
        if not raw:
            raise UsageError(
                f"{SIGNING_KEY_ENV} is not set in this process; give every Ray node of the sweep the "
                "same key (from a Kubernetes Secret)"
            )
        where = SIGNING_KEY_ENV
    else:
        try:
            mode = os.stat(source).st_mode
            raw = Path(source).read_text().strip()
        except FileNotFoundError:
            raise UsageError(
                f"the signing key {source} is missing on this node; set {SIGNING_KEY_ENV} on every "
                "node of the cluster instead"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UsageError(f"the signing key {source} is readable by other users; run `chmod 600 {source}`")
        where = source
    if len(raw) < MIN_KEY_CHARS:
        raise UsageError(
            f"the signing key in {where} is shorter than {MIN_KEY_CHARS} characters; "
            "make one with `openssl rand -hex 32`"
        )
    return raw.encode("utf-8")


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode("ascii")


def seal(key: bytes, payload: bytes) -> bytes:
    """`payload` in its envelope: the magic, its HMAC in hex, a newline, the bytes."""
    return MAGIC + _mac(key, payload) + b"\n" + payload


def unseal(key: bytes, sealed: bytes, source: str) -> bytes:
    """The bytes inside a `seal`ed envelope once their HMAC checks; SignatureError naming `source` otherwise."""
    if not sealed.startswith(MAGIC) or len(sealed) < HEADER_LEN or sealed[HEADER_LEN - 1 : HEADER_LEN] != b"\n":
        raise SignatureError(f"{source} is not signed by gan-job")
    payload = sealed[HEADER_LEN:]
    if not hmac.compare_digest(sealed[len(MAGIC) : HEADER_LEN - 1], _mac(key, payload)):
        raise SignatureError(f"{source} does not match its signature (altered, or signed with another key)")
    return payload
