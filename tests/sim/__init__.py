"""Tests of the Ollama simulator (sim/)."""
