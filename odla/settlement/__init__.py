"""Paying for work: prices, the ledger, wallet sign-in, and settlement on an EVM chain.

- ``prices``: what a model's tokens cost, in the settlement unit's smallest denomination.
- ``ledger``: a double-entry ledger in the operator's SQLite, moved by countersigned receipts.
- ``signin``: Sign-In with Ethereum (EIP-4361) for clients; bearer tokens that work as API keys do.
- ``purse``: what a client may still spend, and the holds of its running jobs (402 before work).
- ``chain``: the escrow contract through web3.py (imported only with ``settlement: "evm"``).
"""
