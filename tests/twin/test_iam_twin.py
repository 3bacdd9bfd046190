"""IAM in the twin: every call through the proxy is authorised for its principal against the synthesized stacks'
policies (the proxy + moto + the synthesized templates; no instances).

AWS behaviours modelled, and where they are documented:

* identity-policy evaluation: IAM User Guide, "Policy evaluation logic" (tests/twin/test_iam_policy.py);
* the resource ARN each call is authorised on: Service Authorization Reference, "Actions, resources, and
  condition keys for Amazon DynamoDB / Amazon EC2 / Amazon EC2 Auto Scaling / AWS Key Management Service /
  AWS Secrets Manager / Amazon S3 / Amazon SQS / AWS Lambda";
* the refusal: "User: <assumed-role ARN> is not authorized to perform: <action> on resource: <ARN> because no
  identity-based policy allows the <action> action" (IAM User Guide, "Troubleshoot access denied error
  messages"), with each protocol's error code (EC2 ``UnauthorizedOperation``; query ``AccessDenied``; JSON
  ``AccessDeniedException``; S3 ``AccessDenied``);
* Lambda account concurrency: "Lambda quotas" (1,000 concurrent executions by default), answered by
  ``GetAccountSettings`` (AWS Lambda API Reference).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.twin.iam_templates import ARNS, CFG, authorizer, templates
from twin.aws import REGION, MotoAws
from twin.events import LambdaContext, load_handler
from twin.iam_policy import IntrinsicResolver, PolicyError
from twin.principals import PrincipalSource

LIFECYCLE = CFG.etcd_lifecycle_function_name
RECONCILER = CFG.reconciler_function_name
TABLE = CFG.cluster_state_table_name
GROUP = CFG.control_plane_group_names[0]


class Backend:
    """The lifecycle backend the proxy calls for CompleteLifecycleAction (records what reached it)."""

    def __init__(self) -> None:
        self.completed: list[str] = []

    def complete_action(self, group: str, hook: str, instance_id: str, token: str, result: str) -> None:
        self.completed.append(instance_id)

    def heartbeat(self, group: str, hook: str, instance_id: str, token: str) -> None:
        return None

    def terminate_in_group(self, instance_id: str, decrement: bool) -> str:
        return GROUP

    def lifecycle_state(self, instance_id: str) -> str | None:
        return None


def start(tmp_path: Path, stacks: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> tuple[MotoAws, Backend]:
    backend = Backend()
    extra = kwargs.pop("extra", ())
    aws = MotoAws(tmp_path, backend, authorizer=authorizer(stacks, extra=extra), **kwargs).start()
    return aws, backend


@pytest.fixture(scope="module")
def shared_aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MotoAws, Backend]]:
    aws, backend = start(tmp_path_factory.mktemp("aws"))
    try:
        yield aws, backend
    finally:
        aws.stop()


@pytest.fixture
def twin_aws(shared_aws: tuple[MotoAws, Backend]) -> tuple[MotoAws, Backend]:
    """One moto per module (a start costs seconds), emptied before each test: moto's reset, a fresh record."""
    aws, backend = shared_aws
    urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{aws.moto_port}/moto-api/reset", method="POST"), timeout=10
    ).close()
    assert aws.authorizer is not None
    aws.authorizer.denials.clear()
    aws.authorizer.unreachable.clear()
    aws.authorizer.forget_usage()
    backend.completed.clear()
    return aws, backend


def make_table(aws: MotoAws) -> None:
    aws.client("dynamodb").create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


def make_group(aws: MotoAws, name: str, cluster_tag: str) -> None:
    ec2, asg = aws.client("ec2"), aws.client("autoscaling")
    ec2.create_launch_template(LaunchTemplateName=f"lt-{name}", LaunchTemplateData={"ImageId": "ami-12c6146b"})
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateName": f"lt-{name}"},
        MinSize=0,
        MaxSize=1,
        DesiredCapacity=0,
        AvailabilityZones=[f"{REGION}a"],
        Tags=[{"Key": CFG.CLUSTER_TAG_KEY, "Value": cluster_tag, "PropagateAtLaunch": True}],
    )


def denied(err: pytest.ExceptionInfo[ClientError]) -> tuple[str, str]:
    return err.value.response["Error"]["Code"], err.value.response["Error"]["Message"]


# -- denied calls name principal, action and resource -----------------------------------------------------------------
def test_the_worker_role_may_not_read_the_cluster_state_table(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, _ = twin_aws
    make_table(aws)
    with pytest.raises(ClientError) as err:
        aws.client("dynamodb", "worker").get_item(TableName=TABLE, Key={"pk": {"S": "cluster"}})
    code, message = denied(err)
    table_arn = f"arn:aws:dynamodb:{REGION}:123456789012:table/{TABLE}"
    assert code == "AccessDeniedException"
    assert f"assumed-role/{CFG.worker_role_name}/" in message
    assert f"dynamodb:GetItem on resource: {table_arn}" in message
    assert "no identity-based policy allows" in message
    assert [(d.principal, d.action, d.resource) for d in aws.authorizer.denials] == [  # type: ignore[union-attr]
        ("worker", "dynamodb:GetItem", table_arn)
    ]


def test_the_control_plane_role_may_read_and_write_the_table_but_not_scan_it(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, _ = twin_aws
    make_table(aws)
    ddb = aws.client("dynamodb", "control-plane")
    ddb.put_item(TableName=TABLE, Item={"pk": {"S": "cluster"}, "initialized": {"BOOL": True}})
    assert ddb.get_item(TableName=TABLE, Key={"pk": {"S": "cluster"}})["Item"]["initialized"] == {"BOOL": True}
    with pytest.raises(ClientError) as err:
        ddb.scan(TableName=TABLE)
    assert "dynamodb:Scan" in denied(err)[1]


def test_a_lambda_role_may_not_terminate_instances(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, _ = twin_aws
    with pytest.raises(ClientError) as err:
        aws.client("ec2", LIFECYCLE).terminate_instances(InstanceIds=["i-0123456789abcdef0"])
    code, message = denied(err)
    assert code == "UnauthorizedOperation"  # EC2's code for an IAM refusal
    assert f"assumed-role/{CFG.etcd_lifecycle_role_name}/{LIFECYCLE}" in message
    assert f"ec2:TerminateInstances on resource: arn:aws:ec2:{REGION}:123456789012:instance/i-0123456789abcdef0" in (
        message
    )
    # what the role is granted passes (Describe* has no resource-level permissions: "*")
    assert aws.client("ec2", LIFECYCLE).describe_instances()["Reservations"] == []


def test_the_lifecycle_lambda_completes_hooks_only_on_the_clusters_groups(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, backend = twin_aws
    make_group(aws, GROUP, "twin")
    make_group(aws, "someone-elses-group", "twin")
    asg = aws.client("autoscaling", LIFECYCLE)
    args = {"LifecycleHookName": "dk8s-terminate", "LifecycleActionResult": "CONTINUE", "InstanceId": "i-1"}
    asg.complete_lifecycle_action(AutoScalingGroupName=GROUP, **args)
    assert backend.completed == ["i-1"]
    with pytest.raises(ClientError) as err:
        asg.complete_lifecycle_action(AutoScalingGroupName="someone-elses-group", **{**args, "InstanceId": "i-2"})
    code, message = denied(err)
    assert code == "AccessDenied"
    assert "autoscaling:CompleteLifecycleAction on resource: arn:aws:autoscaling:" in message
    assert message.split("on resource: ")[1].startswith("arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:")
    assert "autoScalingGroupName/someone-elses-group" in message
    assert backend.completed == ["i-1"]  # the refused completion never reached the state machine


def test_removing_one_permission_from_the_template_makes_that_call_fail(tmp_path: Path) -> None:
    stacks = templates()
    policy = next(
        r
        for lid, r in stacks["IamStack"]["Resources"].items()
        if r["Type"] == "AWS::IAM::Policy" and r["Properties"]["Roles"] == [{"Ref": _role_id(stacks, LIFECYCLE)}]
    )
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    policy["Properties"]["PolicyDocument"]["Statement"] = [s for s in statements if s.get("Sid") != "TerminateHooks"]
    assert len(policy["Properties"]["PolicyDocument"]["Statement"]) == len(statements) - 1
    aws, backend = start(tmp_path, stacks)
    try:
        make_group(aws, GROUP, "twin")
        with pytest.raises(ClientError) as err:
            aws.client("autoscaling", LIFECYCLE).complete_lifecycle_action(
                AutoScalingGroupName=GROUP,
                LifecycleHookName="dk8s-terminate",
                InstanceId="i-1",
                LifecycleActionResult="CONTINUE",
            )
        assert "autoscaling:CompleteLifecycleAction" in denied(err)[1]
        assert backend.completed == []
    finally:
        aws.stop()


def _role_id(stacks: dict[str, dict[str, Any]], function: str) -> str:
    role = {
        "dk8s-twin-etcd-lifecycle": CFG.etcd_lifecycle_role_name,
        "dk8s-twin-etcd-reconciler": CFG.reconciler_role_name,
    }[function]
    return next(lid for lid, r in stacks["IamStack"]["Resources"].items() if r["Properties"].get("RoleName") == role)


# -- resources looked up in moto: secret suffixes, key tags, S3 prefixes --------------------------------------------
def test_secrets_are_authorised_on_their_full_arn(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, _ = twin_aws
    sm = aws.client("secretsmanager")
    sm.create_secret(Name=CFG.etcd_client_secret_name, SecretString="{}")
    sm.create_secret(Name=CFG.kube_client_secret_name, SecretString="{}")
    reconciler = aws.client("secretsmanager", RECONCILER)
    assert reconciler.get_secret_value(SecretId=CFG.etcd_client_secret_name)["SecretString"] == "{}"
    with pytest.raises(ClientError) as err:  # the drain certificate is the lifecycle Lambda's alone
        reconciler.get_secret_value(SecretId=CFG.kube_client_secret_name)
    assert f":secret:{CFG.kube_client_secret_name}-" in denied(err)[1]  # the ARN with moto's random suffix
    # a secret that does not exist is authorised on its bare name, which the "-??????" grant does not match
    with pytest.raises(ClientError) as err:
        aws.client("secretsmanager", LIFECYCLE).get_secret_value(SecretId=CFG.join_secret_name)
    assert denied(err)[0] == "AccessDeniedException"


def test_kms_keys_are_usable_only_when_they_carry_the_cluster_tag(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, _ = twin_aws
    kms = aws.client("kms")
    tagged = kms.create_key(Tags=[{"TagKey": CFG.CLUSTER_TAG_KEY, "TagValue": "twin"}])["KeyMetadata"]["Arn"]
    foreign = kms.create_key(Tags=[{"TagKey": CFG.CLUSTER_TAG_KEY, "TagValue": "other"}])["KeyMetadata"]["Arn"]
    node = aws.client("kms", "control-plane")
    assert node.describe_key(KeyId=tagged)["KeyMetadata"]["Arn"] == tagged
    with pytest.raises(ClientError) as err:
        node.describe_key(KeyId=foreign)
    assert f"kms:DescribeKey on resource: {foreign}" in denied(err)[1]


def test_snapshots_may_be_written_only_under_their_prefix(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, _ = twin_aws
    bucket = CFG.snapshot_bucket_name("123456789012", REGION)
    aws.client("s3").create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3 = aws.client("s3", "control-plane")
    s3.put_object(Bucket=bucket, Key="snapshots/a.db", Body=b"x")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["snapshots/a.db"]
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket=bucket, Key="elsewhere/a.db", Body=b"x")
    code, message = denied(err)
    assert code == "AccessDenied"
    assert f"s3:PutObject on resource: arn:aws:s3:::{bucket}/elsewhere/a.db" in message
    with pytest.raises(ClientError):
        aws.client("s3", "worker").get_object(Bucket=bucket, Key="snapshots/a.db")


def test_the_reconciler_may_only_send_to_the_lifecycle_queue(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, _ = twin_aws
    url = aws.client("sqs").create_queue(QueueName=f"{CFG.resource_prefix}-etcd-lifecycle")["QueueUrl"]
    sqs = aws.client("sqs", RECONCILER)
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    with pytest.raises(ClientError) as err:
        sqs.receive_message(QueueUrl=url)
    assert (
        f"sqs:ReceiveMessage on resource: arn:aws:sqs:{REGION}:123456789012:{CFG.resource_prefix}-etcd-lifecycle"
        in (denied(err)[1])
    )


def test_unknown_keys_and_unsigned_requests_are_denied(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, _ = twin_aws
    stranger = boto3.session.Session(region_name=REGION, aws_access_key_id="AKIAUNKNOWN", aws_secret_access_key="x")
    with pytest.raises(ClientError) as err:
        stranger.client("sqs", endpoint_url=aws.endpoint_url).list_queues()
    assert "User: anonymous" in denied(err)[1]


# -- the canary's role from the pipeline stack: a tag condition on the group ---------------------------------------
def test_the_canary_may_replace_only_nodes_of_groups_tagged_with_its_cluster(tmp_path: Path) -> None:
    stacks = templates()
    canary_role = next(lid for lid in stacks["PipelineStack"]["Resources"] if "StagingCanaryRole" in lid and
                       stacks["PipelineStack"]["Resources"][lid]["Type"] == "AWS::IAM::Role")  # fmt: skip
    source = PrincipalSource("canary", stacks["PipelineStack"], canary_role, in_vpc=False, resolver=None)
    # Its grants refer to its CodeBuild project and the artifact bucket: the template alone cannot name them.
    with pytest.raises(PolicyError, match="not a resource with a deterministic name"):
        start(tmp_path, stacks, extra=(source,))

    pseudo = {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": "123456789012"}
    resolver = IntrinsicResolver(
        {**pseudo, "AWS::URLSuffix": "amazonaws.com"},
        ref=lambda lid: f"{lid}-name",
        get_att=lambda lid, attr: f"arn:aws:s3:::{lid.lower()}",
    )
    source = PrincipalSource("canary", stacks["PipelineStack"], canary_role, in_vpc=False, resolver=resolver)
    aws, _ = start(tmp_path / "2", stacks, extra=(source,))
    try:
        staging = "dk8s-k8s-staging-control-plane-0"
        make_group(aws, staging, "k8s-staging")
        make_group(aws, "dk8s-k8s-staging-control-plane-9", "not-staging")
        asg, ec2 = aws.client("autoscaling"), aws.client("ec2")
        for group in (staging, "dk8s-k8s-staging-control-plane-9"):
            iid = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
            asg.attach_instances(InstanceIds=[iid], AutoScalingGroupName=group)
            canary = aws.client("autoscaling", "canary")
            if group == staging:
                canary.terminate_instance_in_auto_scaling_group(InstanceId=iid, ShouldDecrementDesiredCapacity=False)
            else:
                with pytest.raises(ClientError) as err:
                    canary.terminate_instance_in_auto_scaling_group(
                        InstanceId=iid, ShouldDecrementDesiredCapacity=False
                    )
                assert "autoScalingGroupName/dk8s-k8s-staging-control-plane-9" in denied(err)[1]
    finally:
        aws.stop()


# -- in-process Lambdas sign as their own role ---------------------------------------------------------------------
def test_an_in_process_handler_signs_as_its_functions_role_even_with_a_client_cached_before(
    twin_aws: tuple[MotoAws, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    aws, _ = twin_aws
    make_table(aws)
    undo = MotoAws.apply_environment(aws.environment())
    try:
        cached = boto3.client("dynamodb", endpoint_url=aws.endpoint_url)  # as a handler module caches it at import
        import types

        module = types.ModuleType("twin_test_handler")

        def handle(event: dict[str, Any], context: Any) -> Any:
            return cached.describe_table(TableName=TABLE)["Table"]["TableName"]

        module.handle = handle  # type: ignore[attr-defined]
        monkeypatch.setitem(__import__("sys").modules, "twin_test_handler", module)
        handler = load_handler("twin_test_handler:handle")
        with pytest.raises(ClientError) as err:  # the lifecycle role has no DynamoDB grant
            handler({}, LambdaContext(LIFECYCLE))
        assert f"assumed-role/{CFG.etcd_lifecycle_role_name}/{LIFECYCLE}" in denied(err)[1]
        with pytest.raises(ClientError) as err:  # outside any invocation: no credentials of any role
            cached.describe_table(TableName=TABLE)
        assert "User: unattributed" in denied(err)[1]
        ec2 = boto3.client("ec2", endpoint_url=aws.endpoint_url)
        module.handle = lambda event, context: ec2.describe_instances()["Reservations"]  # type: ignore[attr-defined]
        assert load_handler("twin_test_handler:handle")({}, LambdaContext(RECONCILER)) == []
    finally:
        undo()


# -- the run's report -------------------------------------------------------------------------------------------------
def test_the_report_lists_denials_and_the_grants_no_call_used(twin_aws: tuple[MotoAws, Backend]) -> None:
    aws, _ = twin_aws
    make_table(aws)
    aws.client("dynamodb", "control-plane").get_item(TableName=TABLE, Key={"pk": {"S": "x"}})
    with pytest.raises(ClientError):
        aws.client("dynamodb", "worker").get_item(TableName=TABLE, Key={"pk": {"S": "x"}})
    report = aws.iam_report()
    assert any(line.startswith("worker: dynamodb:GetItem on arn:aws:dynamodb:") for line in report["denied"])
    unused = report["unused_permissions"]
    cp = unused["control-plane"]
    assert not any(line.endswith(" dynamodb:GetItem") for line in cp)  # used once
    assert any(line.endswith(":ClusterState dynamodb:PutItem") for line in cp)  # granted, never used here
    assert any(line.endswith(" autoscaling:CompleteLifecycleAction") for line in unused[LIFECYCLE])


# -- account quotas ---------------------------------------------------------------------------------------------------
def test_get_account_settings_answers_the_twins_concurrency_quota(tmp_path: Path) -> None:
    aws, _ = start(tmp_path, lambda_concurrency_quota=10, reserved_concurrency=2)
    try:
        limit = aws.client("lambda").get_account_settings()["AccountLimit"]
        assert (limit["ConcurrentExecutions"], limit["UnreservedConcurrentExecutions"]) == (10, 8)
        with pytest.raises(ClientError) as err:  # a role without lambda:GetAccountSettings is refused first
            aws.client("lambda", "worker").get_account_settings()
        assert "lambda:GetAccountSettings on resource: *" in denied(err)[1]
    finally:
        aws.stop()
    with pytest.raises(ValueError, match="lambda_concurrency_quota=0"):
        MotoAws(tmp_path, Backend(), lambda_concurrency_quota=0)


def test_the_default_quota_is_awss_default(tmp_path: Path) -> None:
    aws = MotoAws(tmp_path, Backend()).start()
    try:
        assert aws.client("lambda").get_account_settings()["AccountLimit"]["ConcurrentExecutions"] == 1000
    finally:
        aws.stop()
    assert ARNS.region == REGION


# -- the whole twin with IAM and endpoints enforced ----------------------------------------------------------------
def test_the_bootstrap_runs_with_iam_and_endpoints_enforced_and_nothing_denied(real_twin: Any) -> None:
    """Three control planes and two workers bootstrap, the reconciler runs and the cluster-ops Lambda answers, every
    call signed as its own role and authorised against the synthesized stacks (TwinOptions.enforce_iam, the
    default): no call of the product is denied and none goes to a service without a VPC endpoint."""
    twin = real_twin
    assert twin.aws.authorizer is not None, "the twin enforces IAM by default"
    twin.wait_bootstrapped(timeout=180)
    twin.run_reconciler()
    status = twin.ops("status")
    assert status, status
    report = twin.aws.iam_report()
    assert report["denied"] == [], "\n".join(report["denied"])
    assert report["unreachable"] == [], "\n".join(report["unreachable"])
    unused = report["unused_permissions"]
    # the calls were made as the roles (their grants were used), not as the unrestricted harness
    assert not any(r.endswith(":ClusterState dynamodb:PutItem") for r in unused["control-plane"])  # the election
    assert not any(r.endswith(" autoscaling:CompleteLifecycleAction") for r in unused["worker"])  # its launch hook
    ops = unused.get(CFG.cluster_ops_function_name, [])
    assert not any(r.endswith(":EtcdClientCertificate secretsmanager:GetSecretValue") for r in ops)
    print("granted but unused in this run:", json.dumps(report["unused_permissions"], indent=1))


def test_the_preflight_lambda_concurrency_check_runs_against_the_twin(tmp_path: Path) -> None:
    """pipeline/preflight.py's check, unchanged, against the twin's endpoint: with a 10-execution quota Lambda
    keeps all 10 unreserved ("Lambda quotas": it always keeps 100, or the whole quota when smaller), so any
    reservation fails; with the default 1,000 the template's reservations fit."""
    from pipeline.preflight import check_lambda_concurrency

    functions = [
        r for r in templates()["K8sClusterStack"]["Resources"].values() if r["Type"] == "AWS::Lambda::Function"
    ]
    reserved = {
        r["Properties"]["FunctionName"]: int(r["Properties"]["ReservedConcurrentExecutions"])
        for r in functions
        if "ReservedConcurrentExecutions" in r["Properties"]
    }
    for quota, asked, status in ((10, {"dk8s-twin-etcd-lifecycle": 1}, "FAIL"), (1000, reserved, "ok")):
        aws = MotoAws(tmp_path / str(quota), Backend(), lambda_concurrency_quota=quota).start()
        try:
            result = check_lambda_concurrency(aws.client, asked)
        finally:
            aws.stop()
        assert result.status == status, result
        assert f"quota {quota}, unreserved {quota}" in result.found
