"""waiting-room: a hospital waiting-room queue, live on MQTT, Home Assistant and wall displays."""

__version__ = "0.1.0"
