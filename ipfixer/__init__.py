"""ipfixer: an eBPF flow meter exporting IPFIX (RFC 7011) and NetFlow v9 (RFC 3954)."""

__version__ = "0.1.0"
