"""``python -m metaflow_sandbox_daytona.emulator --port 8090``"""

from .server import main

main()
