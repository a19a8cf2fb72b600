"""MCloudTT broker: an MQTT 3.1.1 and 5.0 broker with a sans-IO core and an asyncio shell."""

__version__ = "0.1.0"
