"""Three control-plane and two worker instances start at once in the twin: exactly one initialises."""

from __future__ import annotations

from twin.cluster import Twin
from twin.lifecycle import IN_SERVICE


def test_three_control_planes_and_two_workers_bootstrap_with_exactly_one_initialiser(real_twin: Twin) -> None:
    took = real_twin.wait_bootstrapped(timeout=90)
    assert len(real_twin.initialisers()) == 1, real_twin.launch_results()
    joined = [r for r in real_twin.launch_results().values() if "kubeadm join" in r["kubeadm"]]
    assert len(joined) == 4, "two control-plane joins and two worker joins"
    sample = real_twin.latest()
    assert sample is not None and sample.healthy_voters == 3 and sample.learners == 0 and sample.quorum
    # Every launch hook was completed by the agent itself (CONTINUE through the Auto Scaling API), not by a timeout.
    for inst in real_twin.machine.snapshot():
        assert inst.state == IN_SERVICE and inst.launch_result == "CONTINUE"
        assert any(
            e["kind"] == "hook" and e["instance_id"] == inst.instance_id and e["source"] == "complete"
            for e in real_twin.timeline.events
        )
    assert took < 90


def test_moto_ec2_mirrors_the_twins_instances(real_twin: Twin) -> None:
    real_twin.wait_bootstrapped(timeout=90)
    ec2 = real_twin.aws.client("ec2")
    cfg = real_twin.cfg
    found = {}
    filters = [
        {"Name": f"tag:{cfg.CLUSTER_TAG_KEY}", "Values": [cfg.cluster_name]},
        {"Name": "instance-state-name", "Values": ["running"]},
    ]
    for r in ec2.describe_instances(Filters=filters)["Reservations"]:
        for i in r["Instances"]:
            found[i["InstanceId"]] = (i["PrivateIpAddress"], {t["Key"]: t["Value"] for t in i["Tags"]})
    twin_view = {i.instance_id: i for i in real_twin.machine.snapshot()}
    assert set(found) == set(twin_view)
    for iid, (ip, tags) in found.items():
        assert ip == twin_view[iid].ip and ip.startswith("127.")
        assert tags[cfg.ROLE_TAG_KEY] == twin_view[iid].role
    groups = real_twin.aws.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=list(cfg.control_plane_group_names)
    )["AutoScalingGroups"]
    assert sorted(len(g["Instances"]) for g in groups) == [1, 1, 1]
