"""``python -m metaflow_sandbox_e2b.emulator --port 3999`` (needs the ``emulator`` extra: aiohttp)."""

from .server import main

if __name__ == "__main__":
    main()
