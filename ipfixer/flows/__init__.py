"""Userspace flow accounting (the Go Accounter's model) and the pure timeout rules."""

from ipfixer.flows.accounter import Accounter

__all__ = ["Accounter"]
