"""Metaflow config for metaflow-sandbox: each value reads METAFLOW_<NAME> or ~/.metaflowconfig."""

from metaflow.metaflow_config_funcs import from_conf

# Backend used when @sandbox has no backend= attribute (default: the embedded "local" backend).
SANDBOX_BACKEND = from_conf("SANDBOX_BACKEND")
# Seconds added to a step's time limit for the sandbox's provider-side lifetime (default 600).
# Read as text and parsed where used (plugins/sandbox_inputs.py): a typo must not break `import metaflow`.
SANDBOX_TTL_MARGIN = from_conf("SANDBOX_TTL_MARGIN")
# Extra environment variable names (comma separated) forwarded into every sandbox.
SANDBOX_FORWARD_ENV = from_conf("SANDBOX_FORWARD_ENV", "")
# Directory on the launcher caching pip requirements installed into local sandboxes.
SANDBOX_PIP_CACHE = from_conf("SANDBOX_PIP_CACHE")
# Directory on the launcher caching extracted, precompiled code packages for local sandboxes.
SANDBOX_CODE_CACHE = from_conf("SANDBOX_CODE_CACHE")
# Seconds after a step's @timeout at which the facade stops a task its own alarm did not end (default 60).
# Read as text and parsed where used (plugins/sandbox_cli.py).
SANDBOX_TIMEOUT_GRACE = from_conf("SANDBOX_TIMEOUT_GRACE")
# 0 turns prepared environments off for the run (packages installed in every task). Parsed where used.
SANDBOX_PREPARE = from_conf("SANDBOX_PREPARE")
