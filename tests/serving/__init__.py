"""Tests of odla/serving."""
