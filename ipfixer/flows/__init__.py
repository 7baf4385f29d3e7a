"""The pure flow algorithms: one row builder and carry/merge (rows), one expiry rule (expiry), the
userspace flow cache (accounter). No sockets, no clock reads: time is passed in or injected."""

from ipfixer.flows.accounter import Accounter

__all__ = ["Accounter"]
