"""Sign-In with Ethereum (EIP-4361) for clients: a wallet signs a short message, and the
operator answers with a bearer token that works wherever an API key does, until it expires.

    GET  /auth/nonce                      -> {"nonce": ..., "expires_at": ...}
    POST /auth/verify {message, signature} -> {"token": ..., "account": "0x…", "expires_at": ...}

The message is EIP-4361's text, which the client builds (``message``) and signs as an EIP-191
personal message, as a wallet's ``personal_sign`` does. The operator checks the signature, the
domain it was made for, the chain, the nonce (issued by this operator, used once, within
``NONCE_TTL_S``) and the times. Tokens are kept by their SHA-256 in this operator's memory: a
restart signs everyone out (``client.py login`` again).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Optional

from odla.core.errors import AuthError, ODLAError
from odla.core.times import iso
from odla.proofs.identity import BadSignature, Identity, checksum, hex_signature, recover
from odla.proofs.reports import personal_digest
from odla.serving.auth import WALLET_TOKEN

NONCE_TTL_S = 300.0
"How long a nonce can be signed and sent back."
MAX_NONCES = 100_000
"Nonces waiting at once: past it, the oldest are forgotten (a flood of GET /auth/nonce cannot fill memory)."
MAX_TOKENS = 1_000_000
CLOCK_SKEW_S = 60.0
"How far in the future a message's Issued At may be (clocks differ)."
MAX_MESSAGE = 4096
STATEMENT = "Sign in to use this ODLA network."

_MESSAGE = re.compile(
    r"(?P<domain>[^\s/]+) wants you to sign in with your Ethereum account:\n"
    r"(?P<address>0x[0-9a-fA-F]{40})\n\n"
    r"(?:(?P<statement>[^\n]+)\n)?\n"
    r"URI: (?P<uri>\S+)\n"
    r"Version: (?P<version>1)\n"
    r"Chain ID: (?P<chain_id>[0-9]{1,20})\n"
    r"Nonce: (?P<nonce>[A-Za-z0-9]{8,64})\n"
    r"Issued At: (?P<issued_at>\S+)"
    r"(?:\nExpiration Time: (?P<expiration_time>\S+))?"
    r"(?:\nNot Before: (?P<not_before>\S+))?"
    r"(?:\nRequest ID: (?P<request_id>[^\n]*))?"
    r"(?:\nResources:(?P<resources>(?:\n- \S+)+))?")


@dataclass(frozen=True)
class SignIn:
    """An EIP-4361 message's fields."""

    domain: str
    address: str
    uri: str
    chain_id: int
    nonce: str
    issued_at: str
    expiration_time: Optional[str] = None
    not_before: Optional[str] = None
    statement: Optional[str] = STATEMENT

    @classmethod
    def to(cls, operator: str, address: str, nonce: dict[str, Any], now: float,
           lasts: Optional[float] = None) -> "SignIn":
        """The message that signs ``address`` in to the operator at URL ``operator``, with what its
        ``GET /auth/nonce`` answered, valid ``lasts`` seconds when given. Its domain is the host the
        client's requests name (their ``Host`` header), which the operator checks."""
        import httpx  # its URL gives the host and port as httpx sends them (no default port)

        return cls(domain=httpx.URL(operator).netloc.decode(), address=address, uri=operator,
                   chain_id=nonce["chain_id"], nonce=nonce["nonce"], issued_at=iso(now),
                   expiration_time=iso(now + lasts) if lasts is not None else None)

    def text(self) -> str:
        lines = [f"{self.domain} wants you to sign in with your Ethereum account:", self.address, ""]
        if self.statement:
            lines.append(self.statement)
        lines += ["", f"URI: {self.uri}", "Version: 1", f"Chain ID: {self.chain_id}", f"Nonce: {self.nonce}",
                  f"Issued At: {self.issued_at}"]
        if self.expiration_time:
            lines.append(f"Expiration Time: {self.expiration_time}")
        if self.not_before:
            lines.append(f"Not Before: {self.not_before}")
        return "\n".join(lines)

    @classmethod
    def parse(cls, text: str) -> "SignIn":
        """The message's fields; ``ODLAError`` 422 for text that is not an EIP-4361 message."""
        found = _MESSAGE.fullmatch(text) if len(text) <= MAX_MESSAGE else None
        if found is None:
            raise ODLAError("message is not an EIP-4361 sign-in message (GET /auth/nonce, then sign the message "
                            "client.py login builds)", 422)
        fields = found.groupdict()
        for name in ("issued_at", "expiration_time", "not_before"):
            if fields[name] is not None and _time(fields[name]) is None:
                raise ODLAError(f"message's {name.replace('_', ' ')} is not an RFC 3339 time: {fields[name][:40]}", 422)
        return cls(domain=fields["domain"], address=fields["address"], uri=fields["uri"],
                   chain_id=int(fields["chain_id"]), nonce=fields["nonce"], issued_at=fields["issued_at"],
                   expiration_time=fields["expiration_time"], not_before=fields["not_before"],
                   statement=fields["statement"])

    def sign(self, wallet: Identity) -> str:
        return "0x" + wallet.sign(personal_digest(self.text().encode())).hex()


def _time(text: str) -> Optional[float]:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


class Sessions:
    """Nonces issued, and the tokens of wallets signed in."""

    def __init__(self, ttl_s: float, chain_id: Optional[int], domain: Optional[str] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.chain_id = chain_id
        self.domain = domain
        self.clock = clock
        self.nonces: dict[str, float] = {}
        self.tokens: dict[bytes, tuple[str, float]] = {}

    def nonce(self) -> dict[str, str]:
        now = self.clock()
        while self.nonces and (len(self.nonces) >= MAX_NONCES or next(iter(self.nonces.values())) < now):
            del self.nonces[next(iter(self.nonces))]
        value = secrets.token_hex(16)
        self.nonces[value] = now + NONCE_TTL_S
        # what the message must name besides: this operator's chain (1, Ethereum's, when it settles on none)
        return {"nonce": value, "expires_at": iso(now + NONCE_TTL_S), "chain_id": self.chain_id or 1}

    def verify(self, message: str, signature: str, host: str) -> dict[str, str]:
        """A token for the wallet that signed ``message``; ``AuthError`` (401) saying why not."""
        signin = SignIn.parse(message)
        try:
            signer = recover(personal_digest(message.encode()), hex_signature(signature))
        except (BadSignature, ValueError) as exc:
            raise AuthError(f"signature does not hold: {exc}") from None
        if signer != checksum(signin.address):
            raise AuthError(f"the message is signed by {signer}, not by {signin.address}")
        domain = self.domain or host
        if signin.domain.lower() != domain.lower():
            raise AuthError(f"the message is for {signin.domain}; this operator is {domain}")
        if self.chain_id is not None and signin.chain_id != self.chain_id:
            raise AuthError(f"the message is for chain {signin.chain_id}; this operator settles on {self.chain_id}")
        now = self.clock()
        issued = _time(signin.issued_at)
        assert issued is not None  # parse checked it
        if issued > now + CLOCK_SKEW_S:
            raise AuthError("the message's Issued At is in the future")
        ends = _time(signin.expiration_time) if signin.expiration_time else None
        if ends is not None and ends <= now:
            raise AuthError("the message has expired (its Expiration Time is past): sign a new one")
        starts = _time(signin.not_before) if signin.not_before else None
        if starts is not None and starts > now + CLOCK_SKEW_S:
            raise AuthError("the message is not valid yet (its Not Before is in the future)")
        nonce_ends = self.nonces.pop(signin.nonce, None)  # used once, whatever comes next
        if nonce_ends is None or nonce_ends < now:
            raise AuthError("unknown, used or expired nonce: get a new one from GET /auth/nonce")
        expires = min(now + self.ttl_s, ends if ends is not None else float("inf"))
        token = WALLET_TOKEN + secrets.token_urlsafe(32)
        if len(self.tokens) >= MAX_TOKENS:
            self._forget_expired(now)
        self.tokens[_key(token)] = (signer, expires)
        return {"token": token, "account": signer, "expires_at": iso(expires)}

    def account(self, token: Optional[str]) -> Optional[str]:
        """The wallet a token signs in, or None (unknown or expired)."""
        if not token or not token.startswith(WALLET_TOKEN):
            return None
        found = self.tokens.get(_key(token))
        if found is None:
            return None
        if found[1] <= self.clock():
            del self.tokens[_key(token)]
            return None
        return found[0]

    def forget(self, token: Optional[str]) -> bool:
        return token is not None and self.tokens.pop(_key(token), None) is not None

    def _forget_expired(self, now: float) -> None:
        for key in [k for k, (_, ends) in self.tokens.items() if ends <= now]:
            del self.tokens[key]
        while len(self.tokens) >= MAX_TOKENS:
            del self.tokens[next(iter(self.tokens))]


def _key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
