"""User data for cluster nodes: write the agent's configuration, then start the agent.

Nothing here fetches from the network: every binary and image is in the AMI, and the agent reaches AWS
APIs through the VPC endpoints.
"""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2

AGENT_CONFIG_PATH = "/etc/dedicated-k8s/agent.json"
AGENT_SERVICE = "dedicated-k8s-agent.service"


def agent_user_data(stack: cdk.Stack, agent_config: dict[str, Any]) -> ec2.UserData:
    """Shell user data that writes ``agent_config`` as JSON (tokens resolved at deploy) and starts the agent."""
    user_data = ec2.UserData.for_linux()
    document = stack.to_json_string(agent_config)
    user_data.add_commands(
        "set -euo pipefail",
        "umask 077",
        "install -d -m 0700 /etc/dedicated-k8s",
        f"cat > {AGENT_CONFIG_PATH} <<'DK8S_AGENT_JSON'",
        document,
        "DK8S_AGENT_JSON",
        f"systemctl start {AGENT_SERVICE}",
    )
    return user_data
