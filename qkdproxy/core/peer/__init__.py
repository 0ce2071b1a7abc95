"""The qkdproxy/1 framing between two qkdproxy daemons."""
