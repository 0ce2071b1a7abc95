"""The asyncio key supply: KME clients and the supplies built on them."""
