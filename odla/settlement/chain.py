"""The escrow contract on an EVM chain, through web3.py: deploy it, deposit, post an epoch's
settlement, claim, withdraw, and read an account's standing.

    escrow = Escrow(settings.chain_rpc_url, settings.chain_id, settings.escrow_address)
    escrow.check()                                   # ChainError unless the RPC is that chain
    tx = escrow.deposit(wallet, 10**15)              # wallet: an odla.proofs.identity.Identity
    escrow.standing("0x…")                           # Standing(deposited, charged, claimed, ...)

Calls block (web3's HTTP provider); the operator runs them in a thread (``asyncio.to_thread``)
so that the chain's pace never holds its event loop. Every failure is a ``ChainError`` whose
message says what happened: the contract's own errors are decoded by name (``Overdrawn``,
``NothingToClaim``, …). web3 is imported here only, so nothing else pays its import (a second
or more) unless ``settlement`` is set or a chain command runs.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

ARTIFACT = Path(__file__).with_name("OdlaEscrow.json")
"The contract's ABI and bytecode, compiled from contracts/OdlaEscrow.sol (make contracts)."
CHAINS = {42161: "Arbitrum One", 421614: "Arbitrum Sepolia", 31337: "anvil (local)"}
ZERO_ADDRESS = "0x" + "00" * 20
TIMEOUT_S = 120.0
"How long a transaction may take to be mined."


class ChainError(Exception):
    """The chain cannot be reached, is not the one configured, or refused a transaction."""


@contextlib.contextmanager
def web3_imported() -> Iterator[None]:
    """Import web3 / eth-account in here: py_ecc (which they import) raises the interpreter's
    recursion limit to 100,000, and a deeply nested JSON body would then overflow the C stack of
    a server's thread instead of being refused. The limit is put back."""
    limit = sys.getrecursionlimit()
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@dataclass(frozen=True)
class Standing:
    """An account as the contract holds it, in wei."""

    deposited: int
    charged: int
    claimed: int
    withdrawable_at: int
    "0: no withdrawal requested; else the block time from which ``withdraw`` pays."

    @property
    def available(self) -> int:
        return self.deposited - self.charged


class Escrow:
    def __init__(self, rpc_url: str, chain_id: int, address: Optional[str] = None, timeout: float = 10.0) -> None:
        self.rpc_url = rpc_url
        self.chain_id = chain_id
        self.address = address
        self.timeout = timeout
        with web3_imported():
            from web3 import HTTPProvider, Web3
        self.w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
        self.artifact = json.loads(ARTIFACT.read_text())

    @cached_property
    def contract(self) -> Any:
        if self.address is None:
            raise ChainError("no escrow_address: deploy one with python scripts/escrow.py deploy")
        return self.w3.eth.contract(address=self.w3.to_checksum_address(self.address), abi=self.artifact["abi"])

    @cached_property
    def _errors(self) -> dict[bytes, tuple[str, list[str]]]:
        from eth_utils import keccak
        found = {}
        for item in self.artifact["abi"]:
            if item["type"] == "error":
                types = [i["type"] for i in item["inputs"]]
                found[keccak(text=f"{item['name']}({','.join(types)})")[:4]] = (item["name"], types)
        return found

    # --- reading --------------------------------------------------------------------------

    def check(self) -> None:
        """``ChainError`` unless the RPC answers and is chain ``chain_id``."""
        found = self._call(lambda: self.w3.eth.chain_id)
        if found != self.chain_id:
            raise ChainError(f"{self.rpc_url} is chain {found} ({CHAINS.get(found, 'unknown')}), not chain_id "
                             f"{self.chain_id} ({CHAINS.get(self.chain_id, 'unknown')}): nothing was sent")

    def standing(self, account: str) -> Standing:
        who = self.w3.to_checksum_address(account)
        return Standing(*self._call(lambda: self.contract.functions.standing(who).call()))

    def posted(self) -> tuple[int, str]:
        """The latest epoch posted, and its root."""
        f = self.contract.functions
        return self._call(lambda: f.epoch().call()), "0x" + self._call(lambda: f.root().call()).hex()

    def now(self) -> int:
        """The chain's time: its latest block's timestamp."""
        return self._call(lambda: self.w3.eth.get_block("latest")["timestamp"])

    def balance(self, account: str) -> int:
        return self._call(lambda: self.w3.eth.get_balance(self.w3.to_checksum_address(account)))

    # --- transactions: each returns its hash once mined ------------------------------------

    def deploy(self, wallet: Any, operator: str, withdraw_delay: int, token: Optional[str] = None) -> tuple[str, str]:
        """(the new contract's address, the transaction's hash); ``token``: the ERC-20 it settles in
        (None: the chain's native currency)."""
        self.check()
        factory = self.w3.eth.contract(abi=self.artifact["abi"], bytecode=self.artifact["bytecode"])
        receipt = self._send(wallet, factory.constructor(self.w3.to_checksum_address(operator), withdraw_delay,
                                                         self.w3.to_checksum_address(token or ZERO_ADDRESS)))
        self.address = receipt["contractAddress"]
        return receipt["contractAddress"], "0x" + receipt["transactionHash"].hex().removeprefix("0x")

    def token(self) -> Optional[str]:
        """The ERC-20 the escrow settles in; None: the chain's native currency."""
        found = self._call(lambda: self.contract.functions.token().call())
        return None if int(found, 16) == 0 else found

    def deposit(self, wallet: Any, amount: int) -> str:
        """Deposit ``amount``: sent with the call, or (an ERC-20 escrow) approved for the escrow first,
        when its allowance is short. The deposit's transaction."""
        if amount <= 0:
            raise ChainError("a deposit is a positive number of the settlement unit's smallest denomination")
        token = self.token()
        if token is None:
            return self._tx(wallet, self.contract.functions.deposit(amount), value=amount)
        erc20 = self.w3.eth.contract(address=token, abi=self.artifact["erc20Abi"])
        me = wallet.eth_account().address
        if self._call(lambda: erc20.functions.allowance(me, self.contract.address).call()) < amount:
            self._tx(wallet, erc20.functions.approve(self.contract.address, amount))
        return self._tx(wallet, self.contract.functions.deposit(amount))

    def post(self, wallet: Any, epoch: int, root: str, clients: Sequence[str], charges: Sequence[int],
             vouchers: Sequence[tuple[int, str]]) -> str:
        """``vouchers``: for each client, the cumulative amount it signed off and its signature."""
        return self._tx(wallet, self.contract.functions.post(
            epoch, bytes.fromhex(root.removeprefix("0x")), [self.w3.to_checksum_address(c) for c in clients],
            list(charges), [amount for amount, _ in vouchers],
            [bytes.fromhex(signature.removeprefix("0x")) for _, signature in vouchers]))

    def claim(self, wallet: Any, owed: int, proof: Sequence[str]) -> str:
        return self._tx(wallet, self.contract.functions.claim(owed, [bytes.fromhex(p.removeprefix("0x"))
                                                                     for p in proof]))

    def request_withdrawal(self, wallet: Any) -> str:
        return self._tx(wallet, self.contract.functions.requestWithdrawal())

    def withdraw(self, wallet: Any) -> str:
        return self._tx(wallet, self.contract.functions.withdraw())

    def _tx(self, wallet: Any, call: Any, value: int = 0) -> str:
        self.check()  # never sign for a chain other than the one configured
        receipt = self._send(wallet, call, value)
        return "0x" + receipt["transactionHash"].hex().removeprefix("0x")

    def _send(self, wallet: Any, call: Any, value: int = 0) -> Any:
        account = wallet.eth_account()
        try:
            tx = call.build_transaction({"from": account.address, "value": value, "chainId": self.chain_id,
                                         "nonce": self.w3.eth.get_transaction_count(account.address, "pending")})
            raw = account.sign_transaction(tx).raw_transaction
            sent = self.w3.eth.send_raw_transaction(raw)
            receipt = self.w3.eth.wait_for_transaction_receipt(sent, timeout=TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - web3 raises many kinds; each becomes one message
            raise ChainError(self._describe(exc)) from None
        if receipt["status"] != 1:
            raise ChainError(f"transaction 0x{receipt['transactionHash'].hex().removeprefix('0x')} reverted")
        return receipt

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            raise ChainError(self._describe(exc)) from None

    def _describe(self, exc: Exception) -> str:
        from web3.exceptions import ContractCustomError, ContractLogicError
        if isinstance(exc, ContractCustomError):
            data = exc.data if isinstance(exc.data, str) else str(exc.args[0] if exc.args else "")
            raw = bytes.fromhex(data.removeprefix("0x")) if data else b""
            name, types = self._errors.get(raw[:4], ("an unknown error", []))
            if types:
                from eth_abi import decode
                args = ", ".join(str(a) for a in decode(types, raw[4:]))
                return f"the escrow refused: {name}({args})"
            return f"the escrow refused: {name}"
        if isinstance(exc, ContractLogicError):
            return f"the escrow refused: {exc}"
        name = type(exc).__name__
        if "Connection" in name or "Timeout" in name or isinstance(exc, OSError):
            return f"cannot reach the chain at {self.rpc_url}: {name}"
        return f"{name}: {str(exc)[:300]}"
