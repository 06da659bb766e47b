"""The Merkle tree: every receipt's path reaches the root, as OpenZeppelin's MerkleProof checks it."""

import math

import pytest

from odla.proofs.identity import keccak
from odla.proofs.merkle import EMPTY_ROOT, Tree, hash_pair, leaf, verify


def leaves(n: int) -> list[bytes]:
    return [leaf(keccak(i.to_bytes(4, "big"))) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_every_leaf_proves_and_nothing_else_does(n):
    tree = Tree(leaves(n))
    for i, node in enumerate(tree.levels[0]):
        path = tree.proof(i)
        assert len(path) <= math.ceil(math.log2(n))
        assert verify(path, tree.root, node)
        assert not verify(path, tree.root, leaf(b"another receipt"))
        if path:
            assert not verify(path[:-1], tree.root, node)


def test_pairs_are_hashed_sorted_as_openzeppelin_does():
    a, b = sorted(leaves(2))
    assert hash_pair(a, b) == hash_pair(b, a) == keccak(a + b)
    assert Tree([b, a]).root == keccak(a + b)


def test_an_empty_tree_has_a_zero_root_and_no_proofs():
    tree = Tree([])
    assert tree.root == EMPTY_ROOT and len(tree) == 0
    with pytest.raises(IndexError):
        tree.proof(0)
