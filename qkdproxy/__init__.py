"""qkdproxy: tunnel plaintext TCP over hybrid QKD-KEM TLS 1.3."""

__version__ = "0.1.0"
