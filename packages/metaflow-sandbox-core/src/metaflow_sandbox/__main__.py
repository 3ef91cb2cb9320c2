"""``python -m metaflow_sandbox`` is the ``metaflow-sandbox`` command."""

import sys

from .cli import main

sys.exit(main())
