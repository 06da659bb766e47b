"""Spend vouchers: EIP-712 for one escrow on one chain, as eth-account signs and checks them."""

from eth_account import Account
from eth_account.messages import encode_typed_data

from odla.proofs.identity import Identity
from odla.settlement.vouchers import Voucher

WALLET = Identity(bytes.fromhex("66" * 32))
ESCROW, OTHER = "0x5FbDB2315678afecb367f032d93F642f64180aa3", "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"


def test_a_voucher_is_what_eth_account_signs_and_holds_for_its_escrow_and_chain_only():
    voucher = Voucher(WALLET.address.lower(), 10 ** 18)
    assert voucher.client == WALLET.address  # checksummed
    signature = voucher.sign(WALLET, 31337, ESCROW)
    typed = encode_typed_data(full_message=voucher.typed_data_for(31337, ESCROW))
    assert Account.recover_message(typed, signature=signature) == WALLET.address
    theirs = Account.sign_message(typed, private_key=bytes.fromhex("66" * 32)).signature.hex()
    assert voucher.signer("0x" + theirs.removeprefix("0x"), 31337, ESCROW) == WALLET.address
    assert voucher.signer(signature, 31337, OTHER) != WALLET.address  # another escrow
    assert voucher.signer(signature, 42161, ESCROW) != WALLET.address  # another chain
    assert Voucher(WALLET.address, 10 ** 18 + 1).signer(signature, 31337, ESCROW) != WALLET.address
