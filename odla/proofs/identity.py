"""Keys and addresses: each node and each operator has a secp256k1 key, and its Ethereum address
is who it is.

    me = Identity.load(settings.node_key_file, env_key=settings.node_private_key)  # made on first start
    me.address                       # '0x5B38…' (EIP-55)
    signature = me.sign(digest)      # 65 bytes r ‖ s ‖ v (v = 27 or 28), as eth-account signs a hash
    recover(digest, signature)       # the address that signed, or BadSignature

A key lives in a file only its owner can read (mode 0600, made so on first start): a file that
others can read, or that another user owns, is refused with the command that mends it. A key given
in the environment (``NODE_PRIVATE_KEY``) is used as given and never written. Nothing here logs a
key, and ``repr`` of an ``Identity`` shows only its address.

The curve is coincurve's (libsecp256k1, what eth-keys and so eth-account use when it is there) and
keccak-256 is safe-pysha3's (a C hash, 4x faster a call than pycryptodome's: Merkle roots over a
million receipts hash two million times); eth-account checks both in the tests (tests/proofs), and
``client.py verify`` checks proofs with eth-account itself. Importing eth-account costs 0.7 s to
3 s per process start, which every node and operator would pay.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Optional

import coincurve
from sha3 import keccak_256  # safe-pysha3

_HEX_KEY = re.compile(r"(0x)?([0-9a-fA-F]{64})")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


class KeyFileError(Exception):
    """A key cannot be loaded or made; the message says what to do."""


class BadSignature(ValueError):
    """Not a signature, or one that recovers no key."""


def keccak(data: bytes) -> bytes:
    """Keccak-256 (Ethereum's hash, not NIST SHA3-256)."""
    return keccak_256(data).digest()


def is_address(text: str) -> bool:
    """Is ``text`` an Ethereum address (0x and 40 hex digits, any case)?"""
    return _ADDRESS.fullmatch(text) is not None


@functools.lru_cache(maxsize=4096)  # a network has few addresses, and every receipt names two
def checksum(address: str) -> str:
    """An address in EIP-55 mixed case; ``ValueError`` for anything that is not 20 bytes of hex."""
    if not is_address(address):
        raise ValueError(f"not an address: {address[:50]!r}")
    lower = address[2:].lower()
    hashed = keccak(lower.encode()).hex()
    return "0x" + "".join(c.upper() if int(h, 16) >= 8 else c for c, h in zip(lower, hashed))


def address_of(public: coincurve.PublicKey) -> str:
    return checksum("0x" + keccak(public.format(compressed=False)[1:])[-20:].hex())


def recover(digest: bytes, signature: bytes) -> str:
    """The address whose key made ``signature`` (r ‖ s ‖ v, v 27/28 or 0/1) over the 32-byte ``digest``."""
    if len(signature) != 65 or len(digest) != 32:
        raise BadSignature("a signature is 65 bytes over a 32-byte digest")
    v = signature[64] - 27 if signature[64] >= 27 else signature[64]
    if v not in (0, 1):
        raise BadSignature(f"bad recovery id {signature[64]}")
    try:
        public = coincurve.PublicKey.from_signature_and_message(signature[:64] + bytes([v]), digest, hasher=None)
    except Exception as exc:  # noqa: BLE001 - coincurve raises plain Exception for a bad signature
        raise BadSignature(f"the signature recovers no key ({exc})") from None
    return address_of(public)


def hex_signature(text: str) -> bytes:
    """``0x`` and 130 hex digits as 65 bytes; ``BadSignature`` otherwise."""
    if not isinstance(text, str) or not re.fullmatch(r"0x[0-9a-fA-F]{130}", text):
        raise BadSignature("a signature is 0x and 130 hex digits")
    return bytes.fromhex(text[2:])


class Identity:
    """A private key and its address. Signs 32-byte digests (what EIP-191 and EIP-712 make)."""

    def __init__(self, secret: bytes) -> None:
        try:
            self._key = coincurve.PrivateKey(secret)
        except Exception:  # noqa: BLE001 - zero, or not below the curve's order
            raise KeyFileError("the private key is not a valid secp256k1 key") from None
        self.address = address_of(self._key.public_key)

    def __repr__(self) -> str:
        return f"Identity({self.address})"

    def eth_account(self) -> Any:
        """This key as an eth-account ``LocalAccount``, to sign chain transactions with
        (``odla.settlement.chain``); eth-account is imported only then."""
        from odla.settlement.chain import web3_imported
        with web3_imported():
            from eth_account import Account
        return Account.from_key(self._key.secret)

    def sign(self, digest: bytes) -> bytes:
        """r ‖ s ‖ v with v 27 or 28, as eth-account's ``unsafe_sign_hash`` makes it."""
        raw = self._key.sign_recoverable(digest, hasher=None)
        return raw[:64] + bytes([raw[64] + 27])

    @classmethod
    def load(cls, path: Optional[str], env_key: Optional[str] = None, *, create: bool = True) -> "Identity":
        """The key given in the environment, else the one in ``path`` (made there, mode 0600, when
        there is none and ``create``). ``KeyFileError`` says why neither can be used."""
        if env_key:
            return cls(_parse(env_key, "the key given in the environment"))
        if not path:
            raise KeyFileError("no key file and no key in the environment")
        file = Path(path)
        if not file.exists():
            if not create:
                raise KeyFileError(f"no key file {file}")
            _make(file)
        return cls(_parse(_read_private(file), f"key file {file}"))


def _parse(text: str, where: str) -> bytes:
    match = _HEX_KEY.fullmatch(text.strip())
    if not match:
        raise KeyFileError(f"{where} must hold a private key: 64 hex digits (0x optional)")
    return bytes.fromhex(match[2])


def _read_private(file: Path) -> str:
    """The file's text, if only its owner, this user, can read it."""
    try:
        info = file.stat()
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {file} is not a regular file")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise KeyFileError(f"key file {file} belongs to another user (uid {info.st_uid}); "
                            "a key is read only by the user who owns it")
        if info.st_mode & 0o077:
            raise KeyFileError(f"key file {file} can be read by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                            f"run: chmod 600 {file}")
        return file.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {file}: {exc.strerror}") from None


def _make(file: Path) -> None:
    """A new key in ``file``, readable only by its owner from the first byte; two processes making
    it at once end with one key (the second takes the first's)."""
    if not file.parent.is_dir():
        raise KeyFileError(f"cannot make key file {file}: no directory {file.parent}")
    while True:  # a valid secp256k1 key: below the curve's order and not zero (all but ~2^-128 of draws)
        secret = secrets.token_bytes(32)
        try:
            coincurve.PrivateKey(secret)
            break
        except Exception:  # noqa: BLE001
            continue
    temp = file.with_name(f".{file.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("0x" + secret.hex() + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temp, file)  # never over a key that another process made meanwhile
        except FileExistsError:
            pass
    except OSError as exc:
        raise KeyFileError(f"cannot make key file {file}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
