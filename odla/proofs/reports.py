"""Signed reports: a node's registration (HTTP) and its link's hello (dial) carry a signature
over their own bytes, so the operator knows which key sent them, whatever the transport.

The node writes the report as a JSON object with its ``address`` and ``signed_at`` (Unix
seconds), signs those exact bytes as an EIP-191 personal message, and appends the signature as the
object's last member: ``{…,"signature":"0x<130 hex>"}``. The operator takes the member off the raw
bytes it received (never a re-encoding of what it parsed), recovers the signer, and checks that it
is the ``address`` the report names and that ``signed_at`` is fresh.

    raw = signed(body_json_bytes, me)        # the node
    who = signer(raw, address, signed_at)    # the operator: the address, None when unsigned

A request that only a node's operator may make (managing its models) is signed the other way: the
operator signs its method, path, time and body, in two headers; the node recovers the signer.

    headers = signed_request(me, "POST", "/ollama/api/pull", body)        # the operator
    who = request_signer(headers, "POST", "/ollama/api/pull", body)       # the node
"""

from __future__ import annotations

import re
import time
from typing import Callable, Mapping, Optional

from odla.proofs.identity import BadSignature, Identity, keccak, recover

FRESH_S = 300.0
"How far a report's ``signed_at`` may be from the operator's clock (either way: clocks differ)."
_TAIL = re.compile(rb',"signature":"0x([0-9a-fA-F]{130})"\}\s*\Z')


def personal_digest(message: bytes) -> bytes:
    """EIP-191 version 0x45 (``personal_sign``), as eth-account's ``encode_defunct`` hashes it."""
    return keccak(b"\x19Ethereum Signed Message:\n" + str(len(message)).encode() + message)


def signed(body: bytes, me: Identity) -> bytes:
    """``body`` (a JSON object's text) with its signature appended as the last member."""
    body = body.rstrip()
    if not body.endswith(b"}") or body == b"{}":
        raise ValueError("a signed report is a JSON object with members")
    return body[:-1] + b',"signature":"0x' + me.sign(personal_digest(body)).hex().encode() + b'"}'


def signer(raw: bytes, address: Optional[str], signed_at: Optional[float],
           clock: Callable[[], float] = time.time) -> Optional[str]:
    """Who signed the report ``raw`` (whose parsed ``address`` and ``signed_at`` are given): its
    address, or None when it carries no signature. ``BadSignature`` says why one does not hold."""
    tail = _TAIL.search(raw)
    if tail is None:
        if b'"signature"' in raw:
            raise BadSignature('the signature must be the last member: ,"signature":"0x<130 hex digits>"}')
        return None
    if address is None or signed_at is None:
        raise BadSignature("a signed report names its address and signed_at")
    if abs(clock() - signed_at) > FRESH_S:
        raise BadSignature(f"signed_at is {clock() - signed_at:+.0f} s from this operator's clock "
                           f"(at most {FRESH_S:g} s either way): check the node's clock")
    body = raw[:tail.start()] + b"}"
    who = recover(personal_digest(body), bytes.fromhex(tail[1].decode()))
    if who.lower() != address.lower():
        raise BadSignature(f"signed by {who}, not by the address it names ({address})")
    return who


SIGNED_AT, SIGNATURE = "x-odla-signed-at", "x-odla-signature"


def request_digest(method: str, path: str, signed_at: str, body: bytes) -> bytes:
    return personal_digest(f"{method.upper()} {path} {signed_at}\n".encode() + body)


def signed_request(me: Identity, method: str, path: str, body: bytes, clock: Callable[[], float] = time.time
                   ) -> dict[str, str]:
    """The headers that sign a request as ``me``'s."""
    at = f"{clock():.3f}"
    return {SIGNED_AT: at, SIGNATURE: "0x" + me.sign(request_digest(method, path, at, body)).hex()}


def request_signer(headers: Mapping[str, str], method: str, path: str, body: bytes,
                   clock: Callable[[], float] = time.time) -> Optional[str]:
    """Who signed the request (an address), None when it is not signed; ``BadSignature`` says why
    a signature does not hold (a wrong one, or one older than ``FRESH_S``)."""
    at, signature = headers.get(SIGNED_AT), headers.get(SIGNATURE)
    if not at or not signature:
        return None
    try:
        when = float(at)
    except ValueError:
        raise BadSignature("x-odla-signed-at is Unix seconds") from None
    if abs(clock() - when) > FRESH_S:
        raise BadSignature(f"the request was signed {clock() - when:+.0f} s from this node's clock")
    if not re.fullmatch(r"0x[0-9a-fA-F]{130}", signature):
        raise BadSignature("a signature is 0x and 130 hex digits")
    return recover(request_digest(method, path, at, body), bytes.fromhex(signature[2:]))
