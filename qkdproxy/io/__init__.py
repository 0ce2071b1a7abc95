"""asyncio drivers that connect core objects to transports."""
