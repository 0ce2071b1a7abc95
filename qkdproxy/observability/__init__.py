"""Prometheus metrics, health and status endpoints."""
