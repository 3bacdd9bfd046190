"""Who am I: the instance identity from IMDSv2, behind a tiny interface so tests and the twin inject it."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Protocol

IMDS_BASE = "http://169.254.169.254/latest"


@dataclass(frozen=True)
class InstanceIdentity:
    instance_id: str
    private_ip: str
    region: str
    availability_zone: str = ""

    @property
    def node_name(self) -> str:
        """The EC2 resource-name hostname, which kubeadm uses as node and etcd member name (invariant 1)."""
        if self.region == "us-east-1":
            return f"{self.instance_id}.ec2.internal"
        return f"{self.instance_id}.{self.region}.compute.internal"


class IdentitySource(Protocol):
    def identity(self) -> InstanceIdentity: ...


@dataclass(frozen=True)
class StaticIdentity:
    """A fixed identity (tests, the twin)."""

    value: InstanceIdentity

    def identity(self) -> InstanceIdentity:
        return self.value


class Imdsv2:
    """IMDSv2: a session token by PUT, then GETs carrying it (hop limit 1 is fine on the host)."""

    def __init__(self, base_url: str = IMDS_BASE, timeout: float = 2.0) -> None:
        self.base_url = base_url
        self.timeout = timeout

    def _token(self) -> str:
        req = urllib.request.Request(  # noqa: S310 (fixed link-local http URL)
            f"{self.base_url}/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (fixed link-local URL)
            return str(resp.read().decode())

    def _get(self, token: str, path: str) -> str:
        req = urllib.request.Request(  # noqa: S310
            f"{self.base_url}/{path}", headers={"X-aws-ec2-metadata-token": token}
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
            return str(resp.read().decode()).strip()

    def identity(self) -> InstanceIdentity:
        token = self._token()
        doc = json.loads(self._get(token, "dynamic/instance-identity/document") or "{}")
        return InstanceIdentity(
            instance_id=self._get(token, "meta-data/instance-id"),
            private_ip=self._get(token, "meta-data/local-ipv4"),
            region=self._get(token, "meta-data/placement/region") or str(doc.get("region", "")),
            availability_zone=self._get(token, "meta-data/placement/availability-zone"),
        )
