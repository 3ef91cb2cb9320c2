"""metaflow-sandbox-agent: an example backend. The hooks live in ``plugin.py``, the agent in ``agent.py``."""

__version__ = "0.1.0"
