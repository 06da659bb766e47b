"""An epoch's settlement: what the operator posts on chain when an epoch closes.

From the ledger's balances in closed epochs (``odla.settlement.ledger.closed_balances``):
- each payee's cumulative earnings (a node's address, and the operator's fees), as leaves of a
  Merkle tree the escrow checks claims against: ``keccak256(keccak256(abi.encode(payee, owed)))``,
  OpenZeppelin's standard leaf (the inner hash is 64 bytes, so no inner node passes for a leaf);
- each client's cumulative charge, posted as it is (the contract caps it at the deposit).
Accounts that are not addresses (a client's API key) cannot settle on chain and are left out.

    plan = Settlement.of(ledger.closed_balances(db))
    plan.root, plan.clients, plan.charges, plan.proof("0x…") -> (owed, [sibling, ...])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from odla.proofs.identity import checksum, is_address, keccak
from odla.proofs.merkle import EMPTY_ROOT, Tree, leaf

def owed_leaf(payee: str, owed: int) -> bytes:
    """The escrow's leaf for ``payee`` being owed ``owed`` wei in all."""
    return leaf(keccak(bytes(12) + bytes.fromhex(payee[2:]) + owed.to_bytes(32, "big")))


@dataclass
class Settlement:
    payees: dict[str, int] = field(default_factory=dict)
    "Address -> cumulative earnings (node and operator roles together)."
    clients: dict[str, int] = field(default_factory=dict)
    "Address -> cumulative charge."

    @classmethod
    def of(cls, balances: Iterable[tuple[str, str, int]]) -> "Settlement":
        plan = cls()
        for account, role, amount in balances:
            if not is_address(account):
                continue
            address = checksum(account)
            if role == "client":
                if amount:
                    plan.clients[address] = plan.clients.get(address, 0) - amount
            elif amount:
                plan.payees[address] = plan.payees.get(address, 0) + amount
        return plan

    @property
    def order(self) -> list[str]:
        return sorted(self.payees)

    def tree(self) -> Tree:
        return Tree([owed_leaf(payee, self.payees[payee]) for payee in self.order])

    @property
    def root(self) -> str:
        return "0x" + (self.tree().root if self.payees else EMPTY_ROOT).hex()

    def proof(self, payee: str, tree: Optional[Tree] = None) -> Optional[tuple[int, list[str]]]:
        """(what ``payee`` is owed in all, its Merkle proof), or None when it is owed nothing."""
        payee = checksum(payee)
        if payee not in self.payees:
            return None
        tree = tree or self.tree()
        return self.payees[payee], ["0x" + step.hex() for step in tree.proof(self.order.index(payee))]
