"""``python -m metaflow_sandbox_daytona.emulator --port 8090`` (needs the ``emulator`` extra: aiohttp)."""

from .server import main

main()
