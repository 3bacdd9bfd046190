"""The smoke test passes a healthy cluster and fails, naming the check, on each kind of trouble.

The real kubernetes client (``python -m pipeline.smoke``'s own ``main``) talks HTTP to a fake API server on a
loopback address (tests/pipeline/fake_kube_api.py) through a generated kubeconfig.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.smoke.__main__ import main
from pipeline.smoke.checks import DEFAULT_POD_CIDR, SmokeOptions
from tests.pipeline.fake_kube_api import TOKEN, FakeKubeApi, Scenario, serve

ROLE = "arn:aws:iam::123456789012:role/k8s-staging-smoke-irsa"
EVERY_CHECK = [
    "control-plane nodes Ready",
    "worker nodes Ready",
    "kube-system pods running",
    "CNI DaemonSet ready on every node",
    "DNS service has ready endpoints",
    "test pod scheduled",
    "test pod Running",
    "CNI pod IP from pod CIDR",
    "test pod deleted",
    "IRSA credentials injected",
    "IRSA test pod deleted",
]


@dataclass
class Run:
    code: int
    out: str
    err: str
    api: FakeKubeApi

    @property
    def table(self) -> dict[str, tuple[str, str]]:
        """The printed table: check name -> (PASS/FAIL/SKIP, detail)."""
        lines = self.out.splitlines()
        start = next(i for i, line in enumerate(lines) if re.match(r"^CHECK\s+RESULT\s+DETAIL$", line))
        rows: dict[str, tuple[str, str]] = {}
        for line in lines[start + 1 :]:
            cells = re.split(r"\s{2,}", line, maxsplit=2)
            if len(cells) < 2 or cells[1] not in ("PASS", "FAIL", "SKIP"):
                break
            rows[cells[0]] = (cells[1], cells[2] if len(cells) > 2 else "")
        return rows

    def failed(self) -> list[str]:
        return [name for name, (status, _) in self.table.items() if status == "FAIL"]


def smoke(tmp_path: Path, scenario: Scenario | None = None, *args: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with serve(scenario or Scenario(), tmp_path) as (api, kubeconfig):
        argv = ["--kubeconfig", str(kubeconfig), "--expect-workers", "2", "--timeout", "1", "--poll-interval", "0.02"]
        if "--skip-irsa" not in args:
            argv += ["--irsa-role-arn", ROLE]
        code = main([*argv, *args], stdout=out, stderr=err)
    return Run(code, out.getvalue(), err.getvalue(), api)


def test_healthy_cluster_passes_every_check_and_exits_zero(tmp_path: Path) -> None:
    run = smoke(tmp_path)

    assert run.code == 0, run.err
    assert list(run.table) == EVERY_CHECK
    assert {status for status, _ in run.table.values()} == {"PASS"}
    assert run.err == ""
    assert run.table["control-plane nodes Ready"][1] == "3/3 Ready, expected 3"
    assert run.table["DNS service has ready endpoints"][1] == "kube-dns 10.96.0.10: 2/2 endpoints ready"
    assert re.fullmatch(
        r"smoke-[0-9a-f]{8} has 192\.168\.7\.\d+ \(192\.168\.0\.0/16\)", run.table["CNI pod IP from pod CIDR"][1]
    )
    # Two pods (plain and IRSA) created and deleted, the IRSA service account created and deleted.
    assert len(run.api.created_pods) == 2
    assert run.api.deleted_pods == run.api.created_pods
    assert run.api.pods == {} and run.api.service_accounts == {}
    assert "[smoke] checking control-plane nodes Ready ..." in run.out


def test_the_test_pod_uses_the_pre_pulled_pause_image_and_never_pulls(tmp_path: Path) -> None:
    run = smoke(tmp_path)
    creates = [path for method, path in run.api.requests if method == "POST" and path.endswith("/pods")]
    assert creates == ["/api/v1/namespaces/default/pods"] * 2
    versions = json.loads((Path(__file__).resolve().parents[2] / "imagebuilder" / "versions.json").read_text())
    assert SmokeOptions().image == versions["images"]["pause"]
    assert f"({versions['images']['pause']})" in run.out


def test_a_not_ready_control_plane_node_fails_and_is_named(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(control_plane_ready=[True, False, True]))

    assert run.code == 1
    assert run.failed() == ["control-plane nodes Ready"]
    assert run.table["control-plane nodes Ready"] == ("FAIL", "2/3 Ready, expected 3; not Ready: cp-2")
    assert run.err.startswith("smoke test FAILED: control-plane nodes Ready\n")
    assert "cp-2" in run.err


def test_a_missing_control_plane_node_fails_even_if_the_others_are_ready(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(control_plane_ready=[True, True]))
    assert run.code == 1
    assert run.table["control-plane nodes Ready"] == ("FAIL", "2/2 Ready, expected 3")


def test_fewer_ready_workers_than_expected_fails_the_worker_check(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(workers_ready=[True, False, False]))
    assert run.code == 1
    assert run.failed() == ["worker nodes Ready"]
    assert run.table["worker nodes Ready"][1] == "1/3 Ready, expected at least 2; not Ready: worker-2, worker-3"


def test_pending_system_pod_is_listed(tmp_path: Path) -> None:
    run = smoke(
        tmp_path, Scenario(extra_system_pods={"coredns-5d78c9869d-zzzzz": "Pending", "kube-proxy-x2": "Failed"})
    )

    assert run.code == 1
    assert run.failed() == ["kube-system pods running"]
    assert run.table["kube-system pods running"][1] == (
        "2/8 not running: coredns-5d78c9869d-zzzzz (Pending), kube-proxy-x2 (Failed)"
    )
    assert "kube-system pods running: 2/8 not running: coredns-5d78c9869d-zzzzz (Pending)" in run.err


def test_a_crash_looping_system_pod_is_listed_although_its_phase_is_running(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(crashlooping_system_pods=["coredns-5d78c9869d-fghij"]))
    assert run.code == 1
    assert run.failed() == ["kube-system pods running"]
    assert run.table["kube-system pods running"][1] == (
        "1/6 not running: coredns-5d78c9869d-fghij (Running, not ready: main CrashLoopBackOff)"
    )


def test_calico_not_ready_on_every_node_fails_the_cni_check(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(calico_ready=4))
    assert run.code == 1
    assert run.failed() == ["CNI DaemonSet ready on every node"]
    assert run.table["CNI DaemonSet ready on every node"][1] == "kube-system/calico-node: 4 ready, 5 scheduled, 5 nodes"


def test_a_pod_ip_outside_the_pod_cidr_fails_the_cni_check(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(pod_ip_prefix="10.40.3."))
    assert run.code == 1
    assert run.failed() == ["CNI pod IP from pod CIDR"]
    assert re.search(r"has 10\.40\.3\.\d+, not in 192\.168\.0\.0/16$", run.table["CNI pod IP from pod CIDR"][1])


def test_dns_without_ready_endpoints_fails_the_dns_check(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(dns_ready_endpoints=0, dns_unready_endpoints=2))
    assert run.code == 1
    assert run.failed() == ["DNS service has ready endpoints"]
    assert run.table["DNS service has ready endpoints"][1] == "kube-dns 10.96.0.10: 0/2 endpoints ready"


def test_a_missing_dns_service_fails_the_dns_check(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(dns_service=False))
    assert run.failed() == ["DNS service has ready endpoints"]
    assert run.table["DNS service has ready endpoints"][1] == "Service kube-system/kube-dns not found"


def test_the_test_pod_is_deleted_even_when_a_check_fails(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(schedule_test_pods=False))

    assert run.code == 1
    assert run.failed() == ["test pod scheduled", "test pod Running", "CNI pod IP from pod CIDR"]
    assert run.table["test pod Running"][1].endswith("Pending after 1s")
    assert run.table["test pod deleted"][0] == "PASS"
    (plain, irsa) = run.api.created_pods
    assert run.api.deleted_pods == [plain, irsa]
    assert ("DELETE", f"/api/v1/namespaces/default/pods/{plain}?gracePeriodSeconds=0") in run.api.requests
    assert run.api.pods == {}


def test_the_test_pods_are_deleted_even_when_the_api_fails_in_the_middle_of_a_check(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(fail_pod_reads_until_deleted=True))

    assert run.code == 1
    assert run.failed() == ["test pod Running", "IRSA credentials injected"]
    assert run.table["test pod Running"][1] == "API error 500 Internal Server Error"
    assert run.table["test pod deleted"][0] == "PASS"
    assert run.table["IRSA test pod deleted"][0] == "PASS"
    assert len(run.api.created_pods) == 2
    assert run.api.deleted_pods == run.api.created_pods
    assert run.api.pods == {} and run.api.service_accounts == {}


def test_a_pod_still_present_after_delete_is_waited_for(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(delete_lingers_reads=3))
    assert run.code == 0, run.err
    plain = run.api.created_pods[0]
    reads_after_delete = run.api.requests[
        run.api.requests.index(("DELETE", f"/api/v1/namespaces/default/pods/{plain}?gracePeriodSeconds=0")) + 1 :
    ]
    assert reads_after_delete[:4] == [("GET", f"/api/v1/namespaces/default/pods/{plain}")] * 4


def test_a_pod_that_never_goes_fails_the_deletion_check(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(delete_lingers_reads=10_000))
    assert run.code == 1
    assert run.failed() == ["test pod deleted", "IRSA test pod deleted"]
    assert run.table["test pod deleted"][1].endswith("still present after delete")


def test_missing_irsa_injection_fails_the_irsa_check(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(irsa_webhook=False))

    assert run.code == 1
    assert run.failed() == ["IRSA credentials injected"]
    assert run.table["IRSA credentials injected"][1] == (
        "not injected: AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE (is the pod identity webhook running?)"
    )
    assert "smoke test FAILED: IRSA credentials injected" in run.err
    # The pod and its annotated service account are cleaned up.
    assert run.api.pods == {} and run.api.service_accounts == {}
    (account_create,) = [p for m, p in run.api.requests if m == "POST" and p.endswith("/serviceaccounts")]
    assert account_create == "/api/v1/namespaces/default/serviceaccounts"


def test_the_irsa_pod_runs_under_the_annotated_service_account(tmp_path: Path) -> None:
    run = smoke(tmp_path)
    assert run.table["IRSA credentials injected"][1] == (
        f"AWS_ROLE_ARN={ROLE}, token /var/run/secrets/eks.amazonaws.com/serviceaccount/token"
    )


def test_skip_irsa_prints_a_skipped_row_and_creates_no_service_account(tmp_path: Path) -> None:
    run = smoke(tmp_path, None, "--skip-irsa")
    assert run.code == 0, run.err
    assert run.table["IRSA credentials injected"] == ("SKIP", "skipped (--skip-irsa)")
    assert "IRSA test pod deleted" not in run.table
    assert not [p for m, p in run.api.requests if "serviceaccounts" in p]
    assert len(run.api.created_pods) == 1


def test_an_api_error_fails_that_check_and_the_others_still_run(tmp_path: Path) -> None:
    run = smoke(tmp_path, Scenario(fail_path=r"/daemonsets/"))
    assert run.code == 1
    assert run.failed() == ["CNI DaemonSet ready on every node"]
    assert run.table["CNI DaemonSet ready on every node"][1].startswith("API error 500")
    assert len(run.table) == len(EVERY_CHECK)


def test_a_kubeconfig_the_api_refuses_fails_every_check(tmp_path: Path) -> None:
    with serve(Scenario(), tmp_path) as (api, kubeconfig):
        kubeconfig.write_text(kubeconfig.read_text().replace(TOKEN, "someone-else"))
        out, err = io.StringIO(), io.StringIO()
        code = main(["--kubeconfig", str(kubeconfig), "--skip-irsa"], stdout=out, stderr=err)
    assert code == 1
    assert "control-plane nodes Ready: API error 401 Unauthorized" in err.getvalue()
    assert api.created_pods == []


def test_an_unreadable_kubeconfig_exits_two_and_says_so(tmp_path: Path) -> None:
    err = io.StringIO()
    code = main(["--kubeconfig", str(tmp_path / "absent"), "--skip-irsa"], stdout=io.StringIO(), stderr=err)
    assert code == 2
    assert err.getvalue().startswith(f"smoke test FAILED: kubeconfig {tmp_path / 'absent'}")


def test_either_an_irsa_role_or_skip_irsa_is_required(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--kubeconfig", str(tmp_path / "kubeconfig")], stdout=io.StringIO(), stderr=io.StringIO())
    assert exit_.value.code == 2


def test_the_default_pod_cidr_is_the_clusters() -> None:
    from stages.cluster_stack import POD_CIDR

    assert DEFAULT_POD_CIDR == POD_CIDR
