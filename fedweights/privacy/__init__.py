"""Differential privacy: DP-SGD on clients, accountants, the privacy ledger and reports."""
