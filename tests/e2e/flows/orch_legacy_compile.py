"""`python orch_legacy_compile.py <flow.py> <args>`: compile as a metaflow-sandbox without the
deploy-time refusal would have, to get the template an older version deployed."""

import runpy
import sys

import metaflow.plugins  # noqa: F401  (loads the extension before we reach into it)
from metaflow_extensions.sandbox_core.plugins import sandbox_schedulers

sandbox_schedulers.deploy_command = lambda: None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
