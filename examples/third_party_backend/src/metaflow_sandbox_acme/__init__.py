"""metaflow-sandbox-acme: an example backend. The hooks live in ``plugin.py``."""

__version__ = "0.1.0"
