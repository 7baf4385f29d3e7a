"""Wire formats: IPFIX (RFC 7011) and NetFlow v9 (RFC 3954) encoders, the batch fast path and the
sans-I/O decoder.  Encoders raise EncodeError; the decoder raises only DecodeError."""
