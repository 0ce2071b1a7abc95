"""TLS 1.3 with hybrid QKD-KEM key exchange, on tlslite-ng with `cryptography` underneath."""
