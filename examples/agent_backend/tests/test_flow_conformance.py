"""Run the kit's flow tier: a small real Metaflow flow, every step in an "agent" sandbox.

On S3 when METAFLOW_DATASTORE_SYSROOT_S3 (and S3 credentials) are set; on the local datastore with
the sandboxes declared as sharing this machine's files (``AGENT_SHARE_HOST_FS=1``).
"""

import os

import pytest
from metaflow_sandbox.testing import FlowConformance


@pytest.mark.skipif(not os.environ.get("METAFLOW_DATASTORE_SYSROOT_S3"), reason="METAFLOW_DATASTORE_SYSROOT_S3 not set: no S3 to run on")
class TestAgentFlowOnS3(FlowConformance):
    backend = "agent"
    datastore = "s3"

    def flow_env(self) -> dict[str, str]:
        return {"METAFLOW_SKIP_INSTALL_DEPENDENCIES": "1"}  # the sandbox's python already has boto3


class TestAgentFlowSharingHost(FlowConformance):
    backend = "agent"
    datastore = "local"

    def flow_env(self) -> dict[str, str]:
        return {"AGENT_SHARE_HOST_FS": "1"}
