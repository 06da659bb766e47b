"""Tests of odla/operator."""
