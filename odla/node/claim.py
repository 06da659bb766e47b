"""``python node.py claim``: take what this node earned from the escrow on chain.

The node asks each operator it works for what it can claim (``GET /settlement/claims/{address}``:
its earnings in all, in the last settlement the operator posted, with their Merkle proof), and
sends the claim signed with its own key (``node_key_file``), which pays for the gas. The
contract pays ``owed - claimed``: a second claim of the same settlement is refused, nothing is
paid twice. The last line printed is the transaction's hash.
"""

from __future__ import annotations

import sys

import httpx

from odla.core.config import Settings
from odla.core.errors import error_in
from odla.proofs.identity import Identity, KeyFileError


def claim(settings: Settings) -> int:
    """Claim from the first operator that has something for this node; an exit code."""
    try:
        me = Identity.load(settings.node_key_file, settings.node_private_key, create=False)
    except KeyFileError as exc:
        print(f"node claim: {exc}: the node's key signs its receipts and its claims", file=sys.stderr)
        return 2
    problems = []
    for operator in settings.operator_urls:
        try:
            resp = httpx.get(f"{operator}/settlement/claims/{me.address}", timeout=settings.connect_timeout + 10)
        except httpx.HTTPError as exc:
            problems.append(f"{operator}: cannot reach it ({type(exc).__name__})")
            continue
        if resp.status_code != 200:
            problems.append(f"{operator}: {(error_in(resp.content) or f'HTTP {resp.status_code}')[:300]}")
            continue
        found = resp.json()
        rpc = settings.chain_rpc_url
        if not rpc:
            print("node claim: set chain_rpc_url (and chain_id) in config.json: the chain to claim on", file=sys.stderr)
            return 2
        if settings.chain_id is not None and settings.chain_id != found["chain_id"]:
            print(f"node claim: {operator} settles on chain {found['chain_id']}, this config says chain_id "
                  f"{settings.chain_id}: nothing was sent", file=sys.stderr)
            return 1
        from odla.settlement.chain import ChainError, Escrow

        escrow = Escrow(rpc, found["chain_id"], found["escrow"], timeout=30)
        try:
            before = escrow.standing(me.address).claimed
            if before >= found["owed"]:
                print(f"node claim: {me.address} has claimed all it earned in epoch {found['epoch']} "
                      f"({before} wei); nothing more until the next settlement", file=sys.stderr)
                return 1
            tx = escrow.claim(me, found["owed"], found["proof"])
        except ChainError as exc:
            print(f"node claim: {exc}", file=sys.stderr)
            return 1
        print(f"claimed {found['owed'] - before} wei for {me.address} (epoch {found['epoch']}, escrow {found['escrow']})")
        print(tx)
        return 0
    print("node claim: nothing to claim: " + "; ".join(problems), file=sys.stderr)
    return 1

