"""ETSI GS QKD 004 (stateful application interface): the binary codec and an async client.

The KME side of the protocol is :mod:`qkdproxy.kme.server004`; both use :mod:`.codec`.
"""
