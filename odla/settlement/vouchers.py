"""Spend vouchers: what a client signs off that the operator may charge it, in all.

A client signs EIP-712 ``Spend(client, cumulative)`` for the escrow it deposited in (the domain
names the chain and the escrow, so a voucher is good for that escrow only). The operator keeps the
highest it was given, lets the client's jobs spend up to it (402 past it), and posts it with each
charge: the contract refuses a charge that no voucher of the client's covers. So the operator can
never take more from a client than the client signed off, whatever it posts.

    voucher = Voucher(client="0x…", cumulative=10**15)
    signature = voucher.sign(wallet, chain_id, escrow)           # the client (client.py allow)
    voucher.signer(signature, chain_id, escrow)                  # the operator: who signed it
"""

from __future__ import annotations

from dataclasses import dataclass

from odla.proofs.identity import Identity, hex_signature, recover
from odla.proofs.typed import Struct, Typed

SPEND = Struct("Spend", (("client", "address"), ("cumulative", "uint256")), domain={"name": "ODLA Escrow", "version": "1"})


@dataclass(frozen=True)
class Voucher(Typed):
    STRUCT = SPEND
    client: str
    cumulative: int

    def digest_for(self, chain_id: int, escrow: str) -> bytes:
        return SPEND.digest(self._values(), chain_id, escrow)

    def sign(self, wallet: Identity, chain_id: int, escrow: str) -> str:
        return "0x" + wallet.sign(self.digest_for(chain_id, escrow)).hex()

    def signer(self, signature: str, chain_id: int, escrow: str) -> str:
        """The address that signed; ``BadSignature`` (a ValueError) when none did."""
        return recover(self.digest_for(chain_id, escrow), hex_signature(signature))

    def typed_data_for(self, chain_id: int, escrow: str) -> dict:
        """The whole typed message, as a wallet signs it (``eth_signTypedData_v4``)."""
        data = self.typed_data()
        data["domain"] = {**SPEND.domain, "chainId": chain_id, "verifyingContract": escrow}
        data["types"]["EIP712Domain"] = data["types"]["EIP712Domain"] + [
            {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}]
        return data


def kept(db) -> dict[str, tuple[int, str]]:
    """Each client's highest voucher, as the operator kept it: client -> (cumulative, signature)."""
    return {client: (int(cumulative), signature) for client, cumulative, signature in
            db.execute("SELECT client, cumulative, signature FROM vouchers")}


def keep(db, client: str, cumulative: int, signature: str) -> None:
    with db:
        db.execute("INSERT OR REPLACE INTO vouchers (client, cumulative, signature) VALUES (?, ?, ?)",
                   (client, str(cumulative), signature))
