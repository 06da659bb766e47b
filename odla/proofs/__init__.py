"""Proof of work: who each node and operator is (their keys), what they signed, and how to check it."""
