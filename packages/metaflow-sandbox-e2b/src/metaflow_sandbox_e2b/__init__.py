"""metaflow-sandbox's E2B backend. Importing this package imports neither the e2b SDK nor aiohttp."""

__version__ = "0.2.0"
