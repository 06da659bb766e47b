"""EIP-712 typed data for ODLA's fixed structs (a receipt, an epoch): their hash, and the whole
typed message as eth-account and wallets take it.

    RECEIPT = Struct("Receipt", (("jobId", "string"), ("node", "address"), ...))
    RECEIPT.digest(values)          # keccak256(0x1901 ‖ domainSeparator ‖ hashStruct(values))
    RECEIPT.typed_data(values)      # {"types", "primaryType", "domain", "message"}

Only the types ODLA's structs use: ``string``, ``address``, ``bytes32`` and ``uintN``, each one
32-byte word as EIP-712 encodes it. tests/proofs checks every struct against eth-account's
``encode_typed_data``.
"""

from __future__ import annotations

import functools
from dataclasses import fields
from typing import Any, ClassVar, Optional, Sequence

from odla.proofs.identity import checksum, keccak

DOMAIN = {"name": "ODLA", "version": "1"}
"No chain yet: settlement adds ``chainId`` and ``verifyingContract``."
DOMAIN_TYPE = [{"name": "name", "type": "string"}, {"name": "version", "type": "string"}]
DOMAIN_SEPARATOR = keccak(keccak(b"EIP712Domain(string name,string version)") + keccak(DOMAIN["name"].encode())
                          + keccak(DOMAIN["version"].encode()))
ZERO = "0x" + "00" * 32


@functools.lru_cache(maxsize=64)
def domain_separator(name: str, version: str, chain_id: Optional[int] = None, contract: Optional[str] = None) -> bytes:
    """An EIP-712 domain's separator: ODLA's own (name and version), or with a chain and the contract
    that verifies (the escrow's spend vouchers, ``odla.settlement.vouchers``)."""
    fields, words = ["string name", "string version"], keccak(name.encode()) + keccak(version.encode())
    if chain_id is not None:
        fields.append("uint256 chainId")
        words += chain_id.to_bytes(32, "big")
    if contract is not None:
        fields.append("address verifyingContract")
        words += bytes(12) + bytes.fromhex(contract[2:])
    return keccak(keccak(f"EIP712Domain({','.join(fields)})".encode()) + words)


class Struct:
    def __init__(self, name: str, fields: Sequence[tuple[str, str]], domain: Optional[dict[str, Any]] = None) -> None:
        """``domain``: its EIP-712 domain when not ODLA's own (a chain's contract: ``chainId`` and
        ``verifyingContract`` are then given with each digest)."""
        self.name, self.fields = name, tuple(fields)
        self.domain = domain or DOMAIN
        self.names = [field for field, _ in self.fields]
        self.type_hash = keccak(f"{name}({','.join(f'{kind} {field}' for field, kind in self.fields)})".encode())
        self._encoders = [_ENCODERS[kind if not kind.startswith("uint") else "uint"] for _, kind in self.fields]

    def digest(self, values: Sequence[Any], chain_id: Optional[int] = None, contract: Optional[str] = None) -> bytes:
        words = b"".join(encode(value) for encode, value in zip(self._encoders, values))
        separator = DOMAIN_SEPARATOR if self.domain is DOMAIN and chain_id is None else domain_separator(
            self.domain["name"], self.domain["version"], chain_id, contract)
        return keccak(b"\x19\x01" + separator + keccak(self.type_hash + words))

    def message(self, values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.names, values))

    def typed_data(self, values: "Sequence[Any] | dict[str, Any]") -> dict[str, Any]:
        """The whole typed message of ``values`` (in order, or a message by name, taken as it is)."""
        types = {"EIP712Domain": DOMAIN_TYPE, self.name: [{"name": f, "type": k} for f, k in self.fields]}
        message = values if isinstance(values, dict) else self.message(values)
        return {"types": types, "primaryType": self.name, "domain": dict(DOMAIN), "message": message}

    def values(self, message: dict[str, Any]) -> list[Any]:
        """The fields of ``message`` in order; ``ValueError`` unless it has exactly this struct's fields."""
        if not isinstance(message, dict) or set(message) != set(self.names):
            raise ValueError(f"a {self.name} has exactly the fields {', '.join(self.names)}")
        return [message[name] for name in self.names]


class Typed:
    """A frozen dataclass whose fields, in order, are ``STRUCT``'s: its digest and typed data. Each
    value is checked against its EIP-712 type when made (``ValueError``), addresses checksummed."""

    STRUCT: ClassVar[Struct]

    def __post_init__(self) -> None:
        for name, (_, kind) in zip(_names(type(self)), self.STRUCT.fields):
            value = getattr(self, name)
            if kind == "address":
                object.__setattr__(self, name, checksum(value))
            elif kind == "bytes32":
                if not (isinstance(value, str) and len(value) == 66 and value.startswith("0x")):
                    raise ValueError(f"{name} must be 0x and 64 hex digits")
                bytes.fromhex(value[2:])
            elif kind == "string":
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be a string")
            else:  # uintN
                top = 2 ** int(kind[4:]) - 1
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                    raise ValueError(f"{name} must be an integer 0..{top}")

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in _names(type(self)))

    def digest(self) -> bytes:
        """The EIP-712 hash: ``keccak256(0x1901 ‖ domainSeparator ‖ hashStruct(self))``."""
        return self.STRUCT.digest(self._values())

    def message(self) -> dict[str, Any]:
        """The fields by their EIP-712 names."""
        return self.STRUCT.message(self._values())

    def typed_data(self) -> dict[str, Any]:
        """The whole typed message (``eth_account.messages.encode_typed_data(full_message=...)``)."""
        return self.STRUCT.typed_data(self._values())

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Any:
        """From its EIP-712 fields; ``ValueError`` (or ``TypeError``) for a message that is not one."""
        return cls(*cls.STRUCT.values(message))


@functools.cache
def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


_ENCODERS = {
    "string": lambda text: keccak(text.encode()),
    "address": lambda address: bytes(12) + bytes.fromhex(address[2:]),
    "bytes32": lambda hex32: bytes.fromhex(hex32[2:]),
    "uint": lambda number: number.to_bytes(32, "big"),
}
