"""A Merkle tree over receipts, as OpenZeppelin's ``MerkleProof.verify`` checks it on an EVM chain.

    tree = Tree([leaf(digest) for digest in receipt_digests])
    tree.root; tree.proof(i)            # sibling hashes from leaf i up to the root
    verify(proof, tree.root, leaf(d))   # what MerkleProof.verify(proof, root, leaf) answers

Pairs are hashed sorted (``keccak256(min ‖ max)``), so a proof needs no left/right flags. A level
with an odd count carries its last node up unpaired (its proof has one step fewer). A leaf is
``keccak256(receipt digest)``: 32 bytes hashed, never 64, so no inner node can pass for a leaf
(OpenZeppelin's warning). An empty tree's root is zero.
"""

from __future__ import annotations

from typing import Sequence

from odla.proofs.identity import keccak

EMPTY_ROOT = bytes(32)


def leaf(digest: bytes) -> bytes:
    return keccak(digest)


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a <= b else keccak(b + a)


def process_proof(proof: Sequence[bytes], node: bytes) -> bytes:
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node


def verify(proof: Sequence[bytes], root: bytes, node: bytes) -> bool:
    return process_proof(proof, node) == root


class Tree:
    """Every level kept (the leaves first), so that any leaf's proof is a walk up."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.levels: list[list[bytes]] = [list(leaves)]
        level = self.levels[0]
        while len(level) > 1:
            pairs = [keccak(a + b) if a <= b else keccak(b + a) for a, b in zip(level[0::2], level[1::2])]
            if len(level) % 2:
                pairs.append(level[-1])
            self.levels.append(pairs)
            level = pairs

    @property
    def root(self) -> bytes:
        return self.levels[-1][0] if self.levels[0] else EMPTY_ROOT

    def __len__(self) -> int:
        return len(self.levels[0])

    def proof(self, index: int) -> list[bytes]:
        if not 0 <= index < len(self):
            raise IndexError(f"no leaf {index} in a tree of {len(self)}")
        path = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index //= 2
        return path
