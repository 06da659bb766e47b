"""Paying for work: prices, the ledger, wallet sign-in, and settlement on an EVM chain.

- ``prices``: what a model's tokens cost, in the settlement unit's smallest denomination.
- ``ledger``: a double-entry ledger in the operator's SQLite, moved by countersigned receipts.
- ``signin``: Sign-In with Ethereum (EIP-4361) for clients; bearer tokens that work as API keys do.
- ``vouchers``: what a client signs off that it may be charged in all (EIP-712, for one escrow).
- ``purse``: what a client may still spend, and the holds of its running jobs (402 before work).
- ``settle``: an epoch's settlement: clients' cumulative charges, payees' Merkle tree of earnings.
- ``poster``: each closed epoch's settlement posted on chain, and the proofs payees claim with.
- ``chain``: the escrow contract through web3.py (imported only with ``settlement: "evm"``).

The contract itself is ``contracts/OdlaEscrow.sol``; ``OdlaEscrow.json`` here is what it compiles to.
"""
