"""Daytona backend for metaflow-sandbox. Importing this package never imports the Daytona SDK."""

__version__ = "0.2.0"
