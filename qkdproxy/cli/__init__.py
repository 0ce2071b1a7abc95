"""Thin command-line parsing for every qkdproxy command."""
