"""Admission: budgets, rate limits, and the one-step per-request decision over them."""
