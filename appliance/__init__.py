"""Mirage: a fake-IP router appliance (RFC 3089) for a LAN gateway."""

__version__ = "0.1.0"
