"""Reward math as pure functions: text in, float out, never raising on any string."""
