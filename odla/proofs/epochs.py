"""An epoch: the Merkle root over the receipts an operator countersigned in it, signed by that
operator as EIP-712 typed data (as a settlement contract will check it).

    epoch = Epoch(operator=..., number=7, root="0x…", count=1200, started_ms=..., ended_ms=...)
    epoch.digest(); epoch.typed_data(); Epoch.from_message(message)
"""

from __future__ import annotations

from dataclasses import dataclass

from odla.proofs.identity import checksum
from odla.proofs.typed import Struct, Typed

EPOCH = Struct("Epoch", (("operator", "address"), ("number", "uint64"), ("root", "bytes32"), ("count", "uint32"),
                         ("startedMs", "uint64"), ("endedMs", "uint64")))


@dataclass(frozen=True)
class Epoch(Typed):
    STRUCT = EPOCH
    operator: str
    number: int
    root: str
    count: int
    started_ms: int
    ended_ms: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "operator", checksum(self.operator))
        if not (isinstance(self.root, str) and len(self.root) == 66 and self.root.startswith("0x")):
            raise ValueError("root must be 0x and 64 hex digits")
        bytes.fromhex(self.root[2:])
        for name in ("number", "count", "started_ms", "ended_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** (32 if name == "count" else 64):
                raise ValueError(f"{name} must be a non-negative integer in range")
