"""Runners over exported artifacts: load a program, compute logits, generate greedily."""
