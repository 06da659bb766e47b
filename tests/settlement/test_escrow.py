"""The escrow contract on a real EVM (anvil): what it pays, what it refuses, and that the
bytecode shipped is what its source compiles to (issue 27)."""

import subprocess

import pytest

from odla.proofs.identity import Identity
from odla.settlement.chain import ChainError, Escrow
from odla.settlement.settle import Settlement, owed_leaf
from odla.settlement.vouchers import Voucher
from odla.settlement.anvil import ANVIL_KEYS
from tests.helpers import ROOT

OPERATOR, NODE, OTHER_NODE, CLIENT = (Identity(bytes.fromhex(k[2:])) for k in ANVIL_KEYS[:4])


def post(escrow: Escrow, epoch: int, plan: Settlement, signed_off: int = 0, wallet=CLIENT, by=OPERATOR) -> str:
    """Post ``plan``, each client's charge under a voucher for ``signed_off`` (default: the charge) signed by ``wallet``."""
    vouchers = [(amount, Voucher(client, amount).sign(wallet, 31337, escrow.address)) for client, charge in
                plan.clients.items() for amount in [signed_off or charge]]
    return escrow.post(by, epoch, plan.root, list(plan.clients), list(plan.clients.values()), vouchers)


def deployed(anvil, delay: int = 60) -> Escrow:
    escrow = Escrow(anvil.url, 31337)
    escrow.deploy(OPERATOR, OPERATOR.address, delay)
    return escrow


def test_the_shipped_bytecode_is_what_the_source_compiles_to():
    done = subprocess.run(["node", "compile.mjs", "--check"], cwd=ROOT / "contracts", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_leaves_are_openzeppelins_standard_leaf():
    from eth_abi import encode
    from eth_utils import keccak

    address, owed = NODE.address, 12345 * 10 ** 18
    assert owed_leaf(address, owed) == keccak(keccak(encode(["address", "uint256"], [address, owed])))


def test_deposit_post_claim_once_and_withdraw_after_the_delay(anvil):
    escrow = deployed(anvil, delay=30)
    escrow.deposit(CLIENT, 10_000)
    plan = Settlement(payees={NODE.address: 900, OTHER_NODE.address: 50, OPERATOR.address: 50},
                      clients={CLIENT.address: 1000})
    post(escrow, 1, plan)
    before = escrow.balance(NODE.address)
    owed, proof = plan.proof(NODE.address)
    escrow.claim(NODE, owed, proof)
    assert escrow.standing(NODE.address).claimed == 900 and escrow.balance(NODE.address) > before - 10 ** 15
    with pytest.raises(ChainError, match=r"NothingToClaim\(900\)"):
        escrow.claim(NODE, owed, proof)  # nothing is paid twice
    with pytest.raises(ChainError, match="BadProof"):
        escrow.claim(OTHER_NODE, 51, plan.proof(OTHER_NODE.address)[1])  # more than its leaf says
    with pytest.raises(ChainError, match="BadProof"):
        escrow.claim(CLIENT, owed, proof)  # another's proof
    # the next epoch is cumulative: the node is paid the difference only
    plan.payees[NODE.address] = 1500
    plan.clients[CLIENT.address] = 1600
    with pytest.raises(ChainError, match="StaleEpoch"):
        post(escrow, 1, plan)
    with pytest.raises(ChainError, match="NotOperator"):
        post(escrow, 2, plan, by=CLIENT)
    with pytest.raises(ChainError, match=r"NotSignedOff"):
        post(escrow, 2, plan, signed_off=1599)  # never more than the client signed off
    with pytest.raises(ChainError, match=r"NotSignedOff"):
        post(escrow, 2, plan, wallet=NODE)  # a voucher the client never signed
    with pytest.raises(ChainError, match=r"Overdrawn"):
        post(escrow, 2, Settlement(plan.payees, {CLIENT.address: 10_001}))  # never more than the deposit
    with pytest.raises(ChainError, match=r"ChargeDecreased"):
        post(escrow, 2, Settlement(plan.payees, {CLIENT.address: 999}))
    post(escrow, 2, plan, signed_off=5000)
    escrow.claim(NODE, *plan.proof(NODE.address))
    assert escrow.standing(NODE.address).claimed == 1500
    # withdrawal: asked, refused before the delay, paid after it
    escrow.request_withdrawal(CLIENT)
    with pytest.raises(ChainError, match="TooEarly"):
        escrow.withdraw(CLIENT)
    anvil.rpc("evm_increaseTime", 31)
    anvil.rpc("evm_mine")
    escrow.withdraw(CLIENT)
    assert escrow.standing(CLIENT.address) == escrow.standing(CLIENT.address).__class__(1600, 1600, 0, 0)
    with pytest.raises(ChainError, match="NoWithdrawalRequested"):
        escrow.withdraw(CLIENT)


def test_claims_never_pay_more_than_clients_were_charged(anvil):
    escrow = deployed(anvil)
    escrow.deposit(CLIENT, 100)
    plan = Settlement(payees={NODE.address: 500}, clients={CLIENT.address: 100})  # a root that owes more
    post(escrow, 1, plan)
    with pytest.raises(ChainError, match=r"Unfunded\(100\)"):
        escrow.claim(NODE, *plan.proof(NODE.address))


def test_another_chain_and_no_chain_are_refused_before_anything_is_signed(anvil):
    escrow = deployed(anvil)
    with pytest.raises(ChainError, match="is chain 31337 .* not chain_id 42161 .*nothing was sent"):
        Escrow(anvil.url, 42161, escrow.address).deposit(CLIENT, 1)
    with pytest.raises(ChainError, match="a positive number"):
        escrow.deposit(CLIENT, 0)
    anvil.stop()
    with pytest.raises(ChainError, match="cannot reach the chain"):
        escrow.standing(CLIENT.address)


def test_an_escrow_in_an_erc20_takes_deposits_from_allowances_and_pays_in_the_token(anvil):
    import json

    artifact = json.loads((ROOT / "tests" / "settlement" / "TestToken.json").read_text())
    escrow = Escrow(anvil.url, 31337)
    factory = escrow.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    token_address = escrow._send(OPERATOR, factory.constructor())["contractAddress"]
    token = escrow.w3.eth.contract(address=token_address, abi=artifact["abi"])
    escrow._tx(OPERATOR, token.functions.mint(CLIENT.address, 10_000))
    escrow.deploy(OPERATOR, OPERATOR.address, 0, token_address)
    assert escrow.token() == token_address
    escrow.deposit(CLIENT, 4000)  # approves, then deposits
    assert escrow.standing(CLIENT.address).deposited == 4000
    assert token.functions.balanceOf(CLIENT.address).call() == 6000
    with pytest.raises(ChainError, match="WrongCurrency"):
        escrow._tx(CLIENT, escrow.contract.functions.deposit(1), value=1)  # ETH sent to a token escrow
    plan = Settlement(payees={NODE.address: 2500}, clients={CLIENT.address: 2500})
    post(escrow, 1, plan)
    escrow.claim(NODE, *plan.proof(NODE.address))
    assert token.functions.balanceOf(NODE.address).call() == 2500
    escrow.request_withdrawal(CLIENT)
    escrow.withdraw(CLIENT)  # no delay at deployment
    assert token.functions.balanceOf(CLIENT.address).call() == 6000 + 1500


def test_a_native_escrow_refuses_a_deposit_whose_value_is_not_its_amount(anvil):
    escrow = deployed(anvil)
    assert escrow.token() is None
    with pytest.raises(ChainError, match="WrongCurrency"):
        escrow._tx(CLIENT, escrow.contract.functions.deposit(5), value=4)
