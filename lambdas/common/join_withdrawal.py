"""The lifecycle Lambda's side of an abandoned join (:mod:`lambdas.common.join_watch` decides, the reconciler
asks): withdraw that learner or unstarted member, as the single membership writer.

The request names the member by ID and peer URL, and why it was found abandoned. Nothing in it is trusted as
a fact: under the writer lease the Lambda looks again (a fresh member list; EC2 for the address and, for
``instance-gone``, the instance) and :func:`lambdas.common.membership.withdraw_join` removes the member only if
it is still a change in flight with that peer URL and the reason still holds. A learner never counts for quorum,
so the removal is quorum-safe; a request that no longer holds is deferred (the reconciler asks again next run
if it still should).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from lambdas.common.cluster_aws import GONE_STATES, LambdaSettings
from lambdas.common.etcd_client import EtcdClient, EtcdUnavailableError, TlsMaterial
from lambdas.common.join_watch import AbandonedJoin, live_instances_by_ip
from lambdas.common.membership import RemovalOutcome, observe, withdraw_join
from lambdas.common.termination import RECONCILER_DETAIL_TYPE, RECONCILER_SOURCE, TerminationResult
from lambdas.common.writer_lease import LeaseBusy, WriterLease

WITHDRAW_JOIN = "withdraw-join"
REASONS = ("instance-gone", "stalled", "unclaimed")
_MEMBER_ID = re.compile(r"^[0-9]{1,20}$")  # etcd's uint64 member ID, as its JSON gateway prints it


class WithdrawalPorts(Protocol):
    settings: LambdaSettings
    ec2: Any

    def etcd_tls(self) -> TlsMaterial | None: ...
    def etcd_client(self, tls: TlsMaterial, timeout: float = 2.0) -> EtcdClient: ...
    def etcd_endpoints(self, exclude: Any = ()) -> list[str]: ...
    def instance_states(self, instance_ids: Any) -> dict[str, str | None]: ...
    def writer_lease(self) -> WriterLease: ...


def withdrawal_request(join: AbandonedJoin) -> dict[str, Any]:
    """The reconciler's message for the lifecycle queue."""
    detail = {"kind": WITHDRAW_JOIN, "MemberId": join.member.id, "PeerUrl": join.member.peer_urls[0],
              "why": join.why, "reason": join.reason}  # fmt: skip
    return {"source": RECONCILER_SOURCE, "detail-type": RECONCILER_DETAIL_TYPE, "detail": detail}


def is_withdrawal(body: Any) -> bool:
    detail = body.get("detail") if isinstance(body, dict) else None
    return (
        isinstance(detail, dict)
        and body.get("source") == RECONCILER_SOURCE
        and body.get("detail-type") == RECONCILER_DETAIL_TYPE
        and detail.get("kind") == WITHDRAW_JOIN
    )


@dataclass(frozen=True)
class WithdrawalRequest:
    member_id: str
    peer_url: str
    why: str

    @classmethod
    def parse(cls, body: dict[str, Any]) -> WithdrawalRequest:
        """Raises ValueError naming the bad field (the handler rejects the message: nothing is done)."""
        detail = body["detail"]
        member_id, peer_url, why = detail.get("MemberId"), detail.get("PeerUrl"), detail.get("why")
        if not isinstance(member_id, str) or not _MEMBER_ID.match(member_id):
            raise ValueError(f"detail.MemberId {member_id!r} is not an etcd member ID (a decimal uint64)")
        if not isinstance(peer_url, str) or urlsplit(peer_url).scheme != "https" or not urlsplit(peer_url).hostname:
            raise ValueError(f"detail.PeerUrl {peer_url!r} is not an https peer URL")
        if why not in REASONS:
            raise ValueError(f"detail.why {why!r} is not one of {', '.join(REASONS)}")
        return cls(member_id, peer_url, why)


def handle_withdrawal(request: WithdrawalRequest, ports: WithdrawalPorts) -> TerminationResult:
    tls = ports.etcd_tls()
    if tls is None:
        return TerminationResult("ignored", "the cluster was never initialised: no join to withdraw")
    lease = ports.writer_lease()
    held = lease.acquire(f"etcd-lifecycle withdrawing abandoned join {request.member_id} ({request.why})")
    if isinstance(held, LeaseBusy):
        return TerminationResult("deferred", held.reason(0), writer_lease="busy")
    try:
        result = _withdraw_as_writer(request, ports, tls)
    finally:
        released = lease.release(held)
    return TerminationResult(result.action, result.reason, result.removal, writer_lease="released" if released
                             else "release-failed")  # fmt: skip


def _withdraw_as_writer(request: WithdrawalRequest, ports: WithdrawalPorts, tls: TlsMaterial) -> TerminationResult:
    settings = ports.settings
    endpoints = ports.etcd_endpoints()
    host = urlsplit(request.peer_url).hostname or ""
    holders = live_instances_by_ip(ports.ec2, settings.cluster_tag_key, settings.cluster_name).get(host, [])
    client = ports.etcd_client(tls)
    gone: set[str] = set()
    if request.why == "instance-gone":
        try:  # the member's name gives the instance to ask EC2 about
            view = observe(client, endpoints)
        except EtcdUnavailableError as err:
            return TerminationResult("deferred", f"etcd unreachable: {err}")
        named = [m.instance_id for m in view.members if m.id == request.member_id and m.instance_id]
        states = ports.instance_states(named) if named else {}
        gone = {iid for iid, state in states.items() if state is None or state in GONE_STATES}
    try:
        removal = withdraw_join(client, endpoints, request.member_id, peer_url=request.peer_url, why=request.why,
                                ip_holders=holders, gone_instance_ids=gone)  # fmt: skip
    except EtcdUnavailableError as err:
        return TerminationResult("deferred", f"etcd unreachable: {err}")
    if removal.outcome is RemovalOutcome.UNSAFE:
        return TerminationResult("deferred", removal.reason, removal)
    return TerminationResult("continue", f"withdrew abandoned join: {removal.outcome.value}: {removal.reason}", removal)
