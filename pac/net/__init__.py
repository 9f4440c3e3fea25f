"""Networking: control-plane protocol, data plane, join auth and hosts files."""
