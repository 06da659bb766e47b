"""Tests of odla/node."""
