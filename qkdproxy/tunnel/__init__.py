"""Tunnels: plaintext on one side, hybrid QKD-KEM TLS 1.3 on the other."""
