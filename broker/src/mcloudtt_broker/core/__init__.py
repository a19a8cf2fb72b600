"""Routing and sessions, sans-IO: the broker core the asyncio shell drives."""
