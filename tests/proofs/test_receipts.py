"""Receipts as typed data: our EIP-712 digest is eth-account's, on any receipt."""

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from hypothesis import given, settings as hsettings, strategies as st

from odla.proofs.identity import Identity, recover
from odla.proofs.receipts import Receipt, digest_hex, sha256_hex

NODE = Identity(bytes.fromhex("11" * 32))
OPERATOR = Identity(bytes.fromhex("22" * 32))
hashes = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())

receipts = st.builds(
    Receipt, job_id=st.text(max_size=40), operator=st.just(OPERATOR.address), node=st.just(NODE.address),
    model=st.text(max_size=60), model_digest=hashes, request_hash=hashes, output_hash=hashes,
    prompt_tokens=st.integers(0, 2 ** 32 - 1), output_tokens=st.integers(0, 2 ** 32 - 1),
    started_ms=st.integers(0, 2 ** 64 - 1), ended_ms=st.integers(0, 2 ** 64 - 1),
    outcome=st.sampled_from(["ok", "error", "cancelled"]))


@hsettings(max_examples=40, deadline=None)
@given(receipts)
def test_the_digest_is_eth_accounts_and_a_signature_recovers_in_both(receipt):
    signable = encode_typed_data(full_message=receipt.typed_data())
    assert _hash_eip191_message(signable) == receipt.digest()
    signature = NODE.sign(receipt.digest())
    assert Account.recover_message(signable, signature=signature) == NODE.address
    assert recover(receipt.digest(), signature) == NODE.address
    assert Receipt.from_message(receipt.message()) == receipt


def example(**changes) -> Receipt:
    fields = dict(job_id="ab" * 16, operator=OPERATOR.address, node=NODE.address, model="llama3:latest",
                  model_digest=digest_hex("sha256:" + "cd" * 32), request_hash=sha256_hex(b"request"),
                  output_hash=sha256_hex(b"output"), prompt_tokens=12, output_tokens=100, started_ms=1_700_000_000_000,
                  ended_ms=1_700_000_001_000, outcome="ok")
    return Receipt(**{**fields, **changes})


def test_every_field_is_signed():
    base = example()
    for change in (dict(job_id="x"), dict(model="llama3:8b"), dict(output_tokens=101), dict(outcome="error"),
                   dict(output_hash=sha256_hex(b"other")), dict(ended_ms=1_700_000_001_001),
                   dict(operator=NODE.address)):
        assert example(**change).digest() != base.digest(), change


@pytest.mark.parametrize("bad", [dict(output_tokens=-1), dict(output_tokens=2 ** 32), dict(outcome="done"),
                                 dict(request_hash="0x12"), dict(node="0x1234"), dict(prompt_tokens=True)])
def test_a_receipt_that_cannot_be_signed_is_refused(bad):
    with pytest.raises(ValueError):
        example(**bad)


def test_ollama_digests_become_bytes32():
    assert digest_hex("sha256:" + "AB" * 32) == "0x" + "ab" * 32
    assert digest_hex(None) == digest_hex("latest") == "0x" + "00" * 32


@hsettings(max_examples=20, deadline=None)
@given(st.integers(0, 2 ** 64 - 1), hashes, st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 64 - 1))
def test_an_epochs_digest_is_eth_accounts(number, root, count, ended):
    from odla.proofs.epochs import Epoch

    epoch = Epoch(operator=OPERATOR.address, number=number, root=root, count=count, started_ms=0, ended_ms=ended)
    signable = encode_typed_data(full_message=epoch.typed_data())
    assert _hash_eip191_message(signable) == epoch.digest()
    assert Account.recover_message(signable, signature=OPERATOR.sign(epoch.digest())) == OPERATOR.address
    assert Epoch.from_message(epoch.message()) == epoch
