"""Tests of odla/client."""
