"""Keys, addresses and signed reports, checked against eth-account (the reference)."""

import json
import os
import stat

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from hypothesis import given, settings as hsettings, strategies as st

from odla.proofs.identity import BadSignature, Identity, KeyFileError, checksum, recover
from odla.proofs.reports import FRESH_S, personal_digest, signed, signer

KEY = "0x" + "4c" * 32


def test_an_address_is_eth_accounts():
    me = Identity(bytes.fromhex(KEY[2:]))
    assert me.address == Account.from_key(KEY).address
    assert checksum(me.address.lower()) == me.address
    assert KEY[2:] not in repr(me) and me.address in repr(me)


@hsettings(max_examples=25, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_signatures_are_eth_accounts_both_ways(message):
    me = Identity(bytes.fromhex(KEY[2:]))
    ours = me.sign(personal_digest(message))
    theirs = Account.sign_message(encode_defunct(primitive=message), KEY).signature
    assert ours == bytes(theirs)  # RFC 6979: the same key and digest make the same signature
    assert Account.recover_message(encode_defunct(primitive=message), signature=ours) == me.address
    assert recover(personal_digest(message), bytes(theirs)) == me.address


def test_a_key_file_is_made_for_its_owner_only_and_kept(tmp_path):
    path = tmp_path / "node.key"
    first = Identity.load(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(str(path)).address == first.address  # the same key after a restart
    assert Account.from_key(path.read_text().strip()).address == first.address


def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "node.key"
    path.write_text(KEY)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=f"chmod 600 {path}"):
        Identity.load(str(path))


def test_the_environment_key_wins_and_no_file_is_made(tmp_path):
    path = tmp_path / "node.key"
    assert Identity.load(str(path), env_key=KEY).address == Account.from_key(KEY).address
    assert not path.exists()
    with pytest.raises(KeyFileError, match="64 hex digits"):
        Identity.load(str(path), env_key="0x1234")


def test_a_garbled_key_file_says_so(tmp_path):
    path = tmp_path / "node.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(KeyFileError, match="must hold a private key") as caught:
        Identity.load(str(path))
    assert "not a key" not in str(caught.value)  # what the file holds is never shown


def report(**fields) -> bytes:
    return json.dumps({"node_id": "n1", "models": ["llama3"], **fields}, separators=(",", ":")).encode()


def test_a_signed_report_names_its_signer():
    me = Identity(bytes.fromhex(KEY[2:]))
    raw = signed(report(address=me.address, signed_at=1000.0), me)
    assert json.loads(raw)["signature"].startswith("0x")
    assert signer(raw, me.address, 1000.0, clock=lambda: 1000.0) == me.address
    assert signer(report(), None, None) is None  # unsigned: no signer, not an error


@pytest.mark.parametrize("change, why", [
    (lambda raw: raw.replace(b'"llama3"', b'"llama4"'), "not by the address"),
    (lambda raw: raw.replace(b'"signature":"0x', b'"signature":"0y'), "last member"),
    (lambda raw: raw[:-3] + b'"}', "last member"),
])
def test_a_changed_report_fails(change, why):
    me = Identity(bytes.fromhex(KEY[2:]))
    raw = change(signed(report(address=me.address, signed_at=1000.0), me))
    with pytest.raises(BadSignature, match=why):
        signer(raw, me.address, 1000.0, clock=lambda: 1000.0)


def test_a_stale_or_misattributed_report_fails():
    me, other = Identity(bytes.fromhex(KEY[2:])), Identity(bytes.fromhex("5d" * 32))
    raw = signed(report(address=other.address, signed_at=1000.0), me)
    with pytest.raises(BadSignature, match="not by the address"):
        signer(raw, other.address, 1000.0, clock=lambda: 1000.0)
    raw = signed(report(address=me.address, signed_at=1000.0), me)
    with pytest.raises(BadSignature, match="clock"):
        signer(raw, me.address, 1000.0, clock=lambda: 1000.0 + FRESH_S + 1)
    with pytest.raises(BadSignature):
        recover(b"\0" * 32, b"\0" * 65)


def test_the_scripts_never_import_eth_account():
    """Its import costs 0.7-3 s per process, and py_ecc's raises the recursion limit to 100,000 (deep
    JSON would then crash a thread instead of failing to parse): the reference stays in the tests."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = ("import sys; import server, node, client, odla.proofs.verify; "
            "print([m for m in sys.modules if m.split('.')[0] in ('eth_account', 'py_ecc')], sys.getrecursionlimit())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["[]", "1000"], done.stdout + done.stderr
