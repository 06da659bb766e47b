"""The escrow contract on a real EVM (anvil): what it pays, what it refuses, and that the
bytecode shipped is what its source compiles to (issue 27)."""

import subprocess

import pytest

from odla.proofs.identity import Identity
from odla.settlement.chain import ChainError, Escrow
from odla.settlement.settle import Settlement, owed_leaf
from tests.helpers import ANVIL_KEYS, ROOT

OPERATOR, NODE, OTHER_NODE, CLIENT = (Identity(bytes.fromhex(k[2:])) for k in ANVIL_KEYS[:4])


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
    escrow.post(OPERATOR, 1, plan.root, list(plan.clients), list(plan.clients.values()))
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
        escrow.post(OPERATOR, 1, plan.root, list(plan.clients), list(plan.clients.values()))
    with pytest.raises(ChainError, match="NotOperator"):
        escrow.post(CLIENT, 2, plan.root, [], [])
    with pytest.raises(ChainError, match=r"Overdrawn"):
        escrow.post(OPERATOR, 2, plan.root, [CLIENT.address], [10_001])  # never more than the deposit
    with pytest.raises(ChainError, match=r"ChargeDecreased"):
        escrow.post(OPERATOR, 2, plan.root, [CLIENT.address], [999])
    escrow.post(OPERATOR, 2, plan.root, list(plan.clients), list(plan.clients.values()))
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
    escrow.post(OPERATOR, 1, plan.root, list(plan.clients), list(plan.clients.values()))
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
    escrow.post(OPERATOR, 1, plan.root, list(plan.clients), list(plan.clients.values()))
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
