"""Tests of odla/core."""
