"""Sign-In with Ethereum: messages signed by eth-account (as a wallet signs) verified, and every
way one can be wrong refused with a reason."""

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from odla.core.errors import AuthError, ODLAError
from odla.proofs.identity import Identity
from odla.core.times import iso
from odla.settlement.signin import Sessions, SignIn

WALLET = Account.from_key("0x" + "33" * 32)
HOST = "127.0.0.1:8000"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def message(sessions: Sessions, clock: Clock, **change) -> str:
    fields = dict(domain=HOST, address=WALLET.address, uri=f"http://{HOST}", chain_id=31337,
                  nonce=sessions.nonce()["nonce"], issued_at=iso(clock.now),
                  expiration_time=iso(clock.now + 600))
    fields.update(change)
    return SignIn(**fields).text()


def signed(text: str, account=WALLET) -> str:
    return "0x" + account.sign_message(encode_defunct(text=text)).signature.hex().removeprefix("0x")


def test_a_wallet_signs_in_and_its_token_names_it_until_it_expires():
    clock = Clock()
    sessions = Sessions(3600, 31337, clock=clock)
    text = message(sessions, clock)
    assert SignIn.parse(text).text() == text  # EIP-4361's text, both ways
    answer = sessions.verify(text, signed(text), HOST)
    assert answer["account"] == WALLET.address and answer["token"].startswith("odla_wallet_")
    assert sessions.account(answer["token"]) == WALLET.address
    clock.now += 601  # the message's expiration time bounds the token's
    assert sessions.account(answer["token"]) is None
    # our own signer signs what eth-account recovers
    ours = Identity(bytes.fromhex("33" * 32))
    text = message(sessions, clock, issued_at=iso(clock.now), expiration_time=None)
    assert Account.recover_message(encode_defunct(text=text), signature=SignIn.parse(text).sign(ours)) == WALLET.address
    token = sessions.verify(text, SignIn.parse(text).sign(ours), HOST)["token"]
    assert sessions.forget(token) and sessions.account(token) is None


@pytest.mark.parametrize("change, host, why", [
    ({}, "evil.example:8000", "is for 127.0.0.1:8000"),
    ({"chain_id": 1}, HOST, "chain 1"),
    ({"expiration_time": "2020-01-01T00:00:00Z"}, HOST, "expired"),
    ({"issued_at": "2099-01-01T00:00:00Z"}, HOST, "future"),
    ({"nonce": "0123456789abcdef"}, HOST, "unknown, used or expired nonce"),
])
def test_a_foreign_expired_or_unknown_sign_in_is_refused(change, host, why):
    clock = Clock()
    sessions = Sessions(3600, 31337, clock=clock)
    text = message(sessions, clock, **change)
    with pytest.raises(AuthError, match=why):
        sessions.verify(text, signed(text), host)


def test_a_nonce_works_once_and_a_signature_must_be_the_addresses():
    clock = Clock()
    sessions = Sessions(3600, None, clock=clock)
    text = message(sessions, clock)
    sessions.verify(text, signed(text), HOST)
    with pytest.raises(AuthError, match="nonce"):
        sessions.verify(text, signed(text), HOST)  # replayed
    text = message(sessions, clock)
    with pytest.raises(AuthError, match="is signed by"):
        sessions.verify(text, signed(text, Account.from_key("0x" + "44" * 32)), HOST)
    with pytest.raises(AuthError, match="signature"):
        sessions.verify(text, "0x1234", HOST)
    with pytest.raises(ODLAError, match="not an EIP-4361") as refused:
        sessions.verify("hello", signed("hello"), HOST)
    assert refused.value.status_code == 422
    clock.now += 301
    text2 = message(sessions, clock)
    clock.now += 301  # its nonce has expired
    with pytest.raises(AuthError, match="nonce"):
        sessions.verify(text2, signed(text2), HOST)
