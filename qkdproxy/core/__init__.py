"""The pure core: no asyncio, sockets, aiohttp, files or clocks; time is an argument."""
