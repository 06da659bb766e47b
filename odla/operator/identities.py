"""Which key each node id belongs to: one policy for registrations over HTTP and dial-out links.

    addresses = NodeAddresses(settings.node_addresses, settings.require_signed_nodes, receipts)
    await addresses.open()                     # the bindings kept in jobs_db
    who = addresses.admit(node_id, raw, report) # on each registration and each link's hello

A node signs its reports (``odla.proofs.reports``). The first signed report of an id binds the
id to the signing address (or ``node_addresses`` in the config binds it beforehand); from then on
a report for that id signed by another key, or not signed at all, is refused with 409, so a node
id cannot be taken over by whoever learns the join token. An unsigned report of an unbound id is
taken, unless ``require_signed_nodes`` is on (401). Bindings are kept in the receipts database
and survive a restart.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

from odla.core.errors import AuthError, ODLAError
from odla.core.protocol import NodeReport
from odla.operator.receipts import Receipts
from odla.proofs.identity import BadSignature, checksum
from odla.proofs.reports import signer

log = logging.getLogger("odla.operator")


class NodeAddresses:
    def __init__(self, configured: Mapping[str, str], require: bool, store: Receipts) -> None:
        self.configured = {node_id: checksum(address) for node_id, address in configured.items()}
        self.require = require
        self.store = store
        self.bound: dict[str, str] = {}

    async def open(self) -> None:
        self.bound = {node_id: checksum(address) for node_id, address in (await self.store.addresses()).items()}

    def of(self, node_id: str) -> Optional[str]:
        return self.configured.get(node_id) or self.bound.get(node_id)

    def admit(self, node_id: str, raw: bytes, report: NodeReport) -> Optional[str]:
        """The address that signed ``raw`` (the report as it came, parsed as ``report``), when the
        node may register under ``node_id`` with it; None for an unsigned node that may. Raises
        ``AuthError`` (401: a signature that does not hold, or none where one is required) or
        ``ODLAError`` (409: the id belongs to another key)."""
        try:
            who = signer(raw, report.address, report.signed_at)
        except BadSignature as exc:
            raise AuthError(f"node {node_id}: bad signature: {exc}") from None
        owner = self.of(node_id)
        if who is None:
            if owner is not None:
                raise ODLAError(f"node id {node_id!r} belongs to key {owner}; this registration is not signed", 409)
            if self.require:
                raise AuthError(f"node {node_id} sent no signature; this operator takes only signed nodes "
                                "(require_signed_nodes)")
            return None
        if owner is None:
            self.bound[node_id] = who
            self.store.bind(node_id, who)
            log.info("node %s is key %s", node_id, who)
        elif owner != who:
            raise ODLAError(f"node id {node_id!r} belongs to key {owner}, not {who}: give this node another "
                            "NODE_ID, or its own key", 409)
        return who
