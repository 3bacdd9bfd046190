"""``python -m pipeline.preflight`` against moto: each check passes on a ready account and fails, naming what to
do, on each condition a first deploy trips on, made real in moto (the one exception, Lambda's account settings,
is a botocore Stubber: moto 5.2.5 answers GetAccountSettings with 404 "Not yet implemented").

The templates are the real synthesized ones (``pipeline.preflight_template.synthesize``, once per module); a test
that needs a template the stacks do not produce today (a reservation, a service-linked role) changes a deep copy.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from pipeline.preflight import (
    READ_ACTIONS,
    Clients,
    boto3_clients,
    check_ami,
    check_autoscaling_service_linked_role,
    check_availability_zones,
    check_cdk_bootstrap,
    check_dedicated_tenancy,
    check_imported_vpc,
    check_lambda_concurrency,
    check_leftover_resources,
    check_s3_block_public_access,
    load_config,
    main,
    read_context,
)
from pipeline.preflight_template import PlannedStacks, synthesize
from stages.config import ClusterConfig

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account


@pytest.fixture(scope="module")
def config() -> ClusterConfig:
    return load_config(read_context([]), None, REGION, ACCOUNT)


@pytest.fixture(scope="module")
def planned(config: ClusterConfig) -> PlannedStacks:
    return synthesize(config, {**read_context([]), "region": REGION, "account": ACCOUNT})


@pytest.fixture
def aws_account(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield


def clients_with_lambda_quota(quota: int | None, unreserved: int | None = None) -> Clients:
    """moto's clients, with lambda:GetAccountSettings stubbed to answer ``quota`` (None: AccessDenied)."""
    aws = boto3_clients(REGION)
    lam = boto3.client("lambda", region_name=REGION)
    stub = Stubber(lam)
    if quota is None:
        stub.add_client_error("get_account_settings", "AccessDeniedException", "not authorized", 403)
    else:
        limit = {"ConcurrentExecutions": quota, "UnreservedConcurrentExecutions": unreserved or quota}
        stub.add_response("get_account_settings", {"AccountLimit": limit, "AccountUsage": {"FunctionCount": 0}})
    stub.activate()
    return lambda service: lam if service == "lambda" else aws(service)


def with_reservations(planned: PlannedStacks, reservation: int | None) -> PlannedStacks:
    """The templates with every function's ReservedConcurrentExecutions set to ``reservation`` (None: removed)."""
    templates = copy.deepcopy(dict(planned.templates))
    for template in templates.values():
        for resource in template["Resources"].values():
            if resource["Type"] == "AWS::Lambda::Function":
                resource["Properties"].pop("ReservedConcurrentExecutions", None)
                if reservation is not None:
                    resource["Properties"]["ReservedConcurrentExecutions"] = reservation
    return PlannedStacks(templates)


# --- lambda-concurrency ------------------------------------------------------------------------------


def test_lambda_concurrency_reads_the_reservations_from_the_template(aws_account: None, planned: PlannedStacks) -> None:
    """Lambda: "You can reserve up to the Unreserved account concurrency value minus 100" (Configuring reserved
    concurrency, https://docs.aws.amazon.com/lambda/latest/dg/configuration-concurrency.html); an account with a
    quota of 10 (new accounts) can reserve nothing. No reservation in the template: ok even there."""
    none = with_reservations(planned, None)
    assert none.reserved_concurrency() == {}
    result = check_lambda_concurrency(clients_with_lambda_quota(10), none.reserved_concurrency())
    assert (result.status, result.found) == ("ok", "quota 10, unreserved 10; the stacks reserve 0")

    one_each = with_reservations(planned, 1)
    functions = sum(
        r["Type"] == "AWS::Lambda::Function" for t in planned.templates.values() for r in t["Resources"].values()
    )
    assert sum(one_each.reserved_concurrency().values()) == functions >= 3
    result = check_lambda_concurrency(clients_with_lambda_quota(10), one_each.reserved_concurrency())
    assert result.status == "FAIL"
    assert f"the stacks reserve {functions}" in result.found and "only 0 can be reserved" in result.found
    assert "EtcdLifecycle" in result.found  # names the functions that reserve
    assert f"of at least {functions + 100}" in result.action


def test_lambda_concurrency_allows_reservations_that_leave_100_unreserved(aws_account: None) -> None:
    """The boundary of the documented rule: 1000 unreserved -> 900 reservable, 901 is refused (GetAccountSettings,
    https://docs.aws.amazon.com/lambda/latest/api/API_GetAccountSettings.html, AccountLimit fields)."""
    fits = check_lambda_concurrency(clients_with_lambda_quota(1000), {"a": 600, "b": 300})
    assert fits.status == "ok" and "(of 900 reservable)" in fits.found
    over = check_lambda_concurrency(clients_with_lambda_quota(1000), {"a": 601, "b": 300})
    assert over.status == "FAIL" and "Lambda keeps 100 unreserved" in over.found
    # Other functions of the account already reserve some: what is left unreserved is what counts.
    taken = check_lambda_concurrency(clients_with_lambda_quota(1000, unreserved=150), {"a": 51})
    assert taken.status == "FAIL" and "only 50 can be reserved" in taken.found


# --- autoscaling-service-linked-role ------------------------------------------------------------------


def test_service_linked_role_absent_fails_with_both_remedies(
    aws_account: None, planned: PlannedStacks, config: ClusterConfig
) -> None:
    """KMS refuses a key policy naming a principal that does not exist (MalformedPolicyDocumentException, "Policy
    contains a statement with one or more invalid principals", AWS re:Post knowledge center
    kms-policy-error-invalid-principals); the role exists only once Auto Scaling was used or it was created
    (Service-linked roles for Amazon EC2 Auto Scaling, EC2 Auto Scaling user guide). moto has no SLR until made."""
    aws = boto3_clients(REGION)
    assert planned.key_policies_name("AWSServiceRoleForAutoScaling")  # the cluster key's policy names it
    result = check_autoscaling_service_linked_role(aws, planned, config)
    assert result.status == "FAIL"
    assert "AWSServiceRoleForAutoScaling does not exist" in result.found and "K8sClusterStack" not in result.found
    assert "createAutoScalingServiceLinkedRole=true" in result.action
    assert "aws iam create-service-linked-role --aws-service-name autoscaling.amazonaws.com" in result.action

    boto3.client("iam").create_service_linked_role(AWSServiceName="autoscaling.amazonaws.com")
    result = check_autoscaling_service_linked_role(aws, planned, config)
    assert result.status == "ok" and result.found.endswith("AWSServiceRoleForAutoScaling exists")


def test_service_linked_role_the_stacks_create(
    aws_account: None, planned: PlannedStacks, config: ClusterConfig
) -> None:
    """With the opt-in, IamStack creates the role (AWS::IAM::ServiceLinkedRole): fine while it is absent, and a
    FAIL when it exists (CloudFormation cannot create a service-linked role that exists)."""
    templates = copy.deepcopy(dict(planned.templates))
    iam_stack = next(name for name in templates if name.endswith("-iam"))
    templates[iam_stack]["Resources"]["AutoScalingServiceLinkedRole"] = {
        "Type": "AWS::IAM::ServiceLinkedRole",
        "Properties": {"AWSServiceName": "autoscaling.amazonaws.com"},
    }
    creating = PlannedStacks(templates)
    aws = boto3_clients(REGION)
    assert check_autoscaling_service_linked_role(aws, creating, config).status == "ok"
    boto3.client("iam").create_service_linked_role(AWSServiceName="autoscaling.amazonaws.com")
    result = check_autoscaling_service_linked_role(aws, creating, config)
    assert result.status == "FAIL" and "createAutoScalingServiceLinkedRole=false" in result.action


# --- s3-block-public-access ---------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["BlockPublicPolicy", "RestrictPublicBuckets"])
def test_account_block_public_access_stops_irsa(aws_account: None, setting: str) -> None:
    """S3 Block Public Access (PublicAccessBlockConfiguration, Amazon S3 API reference): BlockPublicPolicy makes S3
    "reject calls to PUT Bucket policy if the specified bucket policy allows public access"; RestrictPublicBuckets
    restricts a bucket with a public policy to AWS service principals and the owner's account, so STS's anonymous
    fetch of the issuer documents fails. Account-level settings override the bucket's own."""
    aws = boto3_clients(REGION)
    assert check_s3_block_public_access(aws, ACCOUNT, irsa=True).found.endswith("public-read policy is allowed")
    block = dict.fromkeys(("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"), False)
    boto3.client("s3control", region_name=REGION).put_public_access_block(
        AccountId=ACCOUNT, PublicAccessBlockConfiguration={**block, "BlockPublicAcls": True, setting: True}
    )
    result = check_s3_block_public_access(aws, ACCOUNT, irsa=True)
    assert result.status == "FAIL"
    assert f"{setting} stop the IRSA issuer bucket's public-read policy" in result.found
    assert "docs/irsa.md" in result.action and "-c irsa=false" in result.action
    # BlockPublicAcls alone is harmless: the issuer bucket has ACLs disabled.
    off = check_s3_block_public_access(aws, ACCOUNT, irsa=False)
    assert off.status == "ok" and "irsa=false" in off.found


def test_block_public_acls_alone_does_not_stop_irsa(aws_account: None) -> None:
    boto3.client("s3control", region_name=REGION).put_public_access_block(
        AccountId=ACCOUNT,
        PublicAccessBlockConfiguration={"BlockPublicAcls": True, "IgnorePublicAcls": True},
    )
    result = check_s3_block_public_access(boto3_clients(REGION), ACCOUNT, irsa=True)
    assert result.status == "ok" and "BlockPublicAcls, IgnorePublicAcls" in result.found


# --- availability-zones, dedicated-tenancy ------------------------------------------------------------


def test_zones_must_exist_in_the_region(aws_account: None) -> None:
    """DescribeAvailabilityZones lists the region's zones with their State (EC2 API reference)."""
    aws = boto3_clients(REGION)
    assert check_availability_zones(aws, ("us-east-1a", "us-east-1b", "us-east-1c")).status == "ok"
    result = check_availability_zones(aws, ("us-east-1a", "us-east-1b", "us-east-1z"))
    assert result.status == "FAIL" and result.found == "not in the region: us-east-1z"
    assert "us-east-1f" in result.action  # lists the usable zones


def test_instance_type_must_be_offered_in_every_zone(aws_account: None) -> None:
    """DescribeInstanceTypeOfferings with LocationType availability-zone (EC2 API reference). moto's offering data
    (like AWS) has no m6i in us-east-1e, an older zone. No EC2 API reports per type whether it can run as a
    Dedicated Instance (InstanceTypeInfo has DedicatedHostsSupported only), so that stays the config's family
    check (stages/config.py NO_DEDICATED_FAMILIES, per Dedicated Instances in the EC2 user guide)."""
    aws = boto3_clients(REGION)
    good = load_config(read_context([]), None, REGION, ACCOUNT)
    assert check_dedicated_tenancy(aws, good).status == "ok"
    zones = read_context(["availabilityZones=us-east-1a,us-east-1b,us-east-1e"])
    result = check_dedicated_tenancy(aws, load_config(zones, None, REGION, ACCOUNT))
    assert result.status == "FAIL" and result.found == "not offered: m6i.large in us-east-1e"
    unknown = read_context(["controlPlaneInstanceType=m6i.mega"])
    result = check_dedicated_tenancy(aws, load_config(unknown, None, REGION, ACCOUNT))
    assert result.status == "FAIL" and "m6i.mega" in result.found and "controlPlaneInstanceType" in result.action


# --- ami -------------------------------------------------------------------------------------------------


def make_ami(version: str) -> str:
    ec2 = boto3.client("ec2", region_name=REGION)
    base = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    image = ec2.create_image(InstanceId=instance, Name=f"dk8s-dedicated-k8s-kubernetes-{version}-2026-12-01")
    ec2.create_tags(Resources=[image["ImageId"]], Tags=[{"Key": "dedicated-k8s:kubernetes-version", "Value": version}])
    return str(image["ImageId"])


def put_ami_parameter(config: ClusterConfig, image_id: str) -> None:
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name=config.ami, Value=image_id, Type="String", DataType="text", Overwrite=True
    )


def test_ami_parameter_image_and_version(aws_account: None, config: ClusterConfig) -> None:
    """The image pipeline writes the AMI ID to the SSM parameter and tags the image dedicated-k8s:kubernetes-version
    (stages/image_stack.py AmiTags); GetParameter answers ParameterNotFound for a missing name and DescribeImages
    InvalidAMIID.NotFound for a missing image (SSM and EC2 API references)."""
    aws = boto3_clients(REGION)
    result = check_ami(aws, config)
    assert result.status == "FAIL" and result.found == f"SSM parameter {config.ami} does not exist"
    assert "scripts/build-k8s-ami-imagebuilder.sh" in result.action
    put_ami_parameter(config, "ami-0123456789abcdef0")
    result = check_ami(aws, config)
    assert result.status == "FAIL" and "ami-0123456789abcdef0: no such image" in result.found
    put_ami_parameter(config, make_ami("1.33.5"))
    result = check_ami(aws, config)
    assert result.status == "FAIL" and f"not Kubernetes {config.kubernetes_version}" in result.found
    put_ami_parameter(config, make_ami(config.kubernetes_version))
    result = check_ami(aws, config)
    assert result.status == "ok" and f"kubernetes-version={config.kubernetes_version}" in result.found


# --- imported-vpc ---------------------------------------------------------------------------------------


def make_private_vpc(cidr: str = "10.50.0.0/16") -> dict[str, Any]:
    """A VPC with one private subnet and route table per zone (a/b/c), DNS support and hostnames on."""
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    subnets, tables = [], []
    for index, zone in enumerate(("us-east-1a", "us-east-1b", "us-east-1c")):
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr.replace("0.0/16", f"{index}.0/24"), AvailabilityZone=zone)
        table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        ec2.associate_route_table(RouteTableId=table, SubnetId=subnet["Subnet"]["SubnetId"])
        subnets.append(subnet["Subnet"]["SubnetId"])
        tables.append(table)
    return {"vpcId": vpc, "vpcCidr": cidr, "privateSubnetIds": subnets, "privateRouteTableIds": tables}


def imported_config(values: dict[str, Any]) -> ClusterConfig:
    overrides = [f"{k}={v if isinstance(v, str) else ','.join(v)}" for k, v in values.items()]
    return load_config(read_context(overrides), None, REGION, ACCOUNT)


def test_imported_vpc_that_is_private_passes(aws_account: None) -> None:
    config = imported_config(make_private_vpc())
    result = check_imported_vpc(boto3_clients(REGION), config.vpc, config.availability_zones)
    assert result.status == "ok" and result.found.endswith("private, one subnet per AZ")


def test_imported_vpc_internet_route_public_ips_and_cidr_fail(aws_account: None) -> None:
    """A subnet uses its explicitly associated route table, else the VPC's main one (Route tables, Amazon VPC user
    guide); interface endpoints' private DNS needs enableDnsSupport and enableDnsHostnames (AWS PrivateLink guide)."""
    values = make_private_vpc()
    ec2 = boto3.client("ec2", region_name=REGION)
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=values["vpcId"])
    ec2.create_route(RouteTableId=values["privateRouteTableIds"][1], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    ec2.modify_subnet_attribute(SubnetId=values["privateSubnetIds"][2], MapPublicIpOnLaunch={"Value": True})
    ec2.modify_vpc_attribute(VpcId=values["vpcId"], EnableDnsHostnames={"Value": False})
    config = imported_config({**values, "vpcCidr": "10.60.0.0/16"})
    result = check_imported_vpc(boto3_clients(REGION), config.vpc, config.availability_zones)
    assert result.status == "FAIL"
    assert "CIDR is 10.50.0.0/16, vpcCidr says 10.60.0.0/16" in result.found
    assert (
        f"{values['privateRouteTableIds'][1]} ({values['privateSubnetIds'][1]}) routes to internet gateway {igw}"
        in (result.found)
    )
    assert f"{values['privateSubnetIds'][2]} maps public IPs on launch" in result.found
    assert "enableDnsHostnames is off" in result.found


def test_imported_vpc_route_table_and_zones_must_match(aws_account: None) -> None:
    values = make_private_vpc()
    swapped = {
        **values,
        "privateRouteTableIds": [*reversed(values["privateRouteTableIds"][:2]), values["privateRouteTableIds"][2]],
    }
    config = imported_config(swapped)
    result = check_imported_vpc(boto3_clients(REGION), config.vpc, config.availability_zones)
    assert result.status == "FAIL"
    assert (
        f"{values['privateSubnetIds'][0]} routes through {values['privateRouteTableIds'][0]}, "
        f"privateRouteTableIds says {values['privateRouteTableIds'][1]}"
    ) in result.found
    other_zones = imported_config({**values, "availabilityZones": "us-east-1a,us-east-1b,us-east-1d"})
    result = check_imported_vpc(boto3_clients(REGION), other_zones.vpc, other_zones.availability_zones)
    assert result.status == "FAIL" and "one per configured AZ (us-east-1a, us-east-1b, us-east-1d)" in result.found


def test_imported_vpc_that_does_not_exist(aws_account: None) -> None:
    values = make_private_vpc()
    config = imported_config({**values, "vpcId": "vpc-0123456789abcdef0"})
    result = check_imported_vpc(boto3_clients(REGION), config.vpc, config.availability_zones)
    assert result.status == "FAIL" and result.found == "vpc-0123456789abcdef0 does not exist in this account and region"


# --- cdk-bootstrap ---------------------------------------------------------------------------------------


def test_bootstrap_version_from_the_templates_rule(aws_account: None, planned: PlannedStacks) -> None:
    """`cdk deploy` reads /cdk-bootstrap/<qualifier>/version (Bootstrapping your environment, AWS CDK v2 guide);
    the template's CheckBootstrapVersion rule refuses versions 1-5, so the minimum is 6."""
    assert planned.bootstrap_requirement() == ("/cdk-bootstrap/hnb659fds/version", 6)
    aws, ssm = boto3_clients(REGION), boto3.client("ssm", region_name=REGION)
    result = check_cdk_bootstrap(aws, planned)
    assert result.status == "FAIL" and "/cdk-bootstrap/hnb659fds/version does not exist" in result.found
    assert "npx cdk bootstrap" in result.action
    ssm.put_parameter(Name="/cdk-bootstrap/hnb659fds/version", Value="5", Type="String")
    assert check_cdk_bootstrap(aws, planned).found.startswith("/cdk-bootstrap/hnb659fds/version = 5;")
    ssm.put_parameter(Name="/cdk-bootstrap/hnb659fds/version", Value="30", Type="String", Overwrite=True)
    assert check_cdk_bootstrap(aws, planned).status == "ok"


# --- leftover-resources ----------------------------------------------------------------------------------


def test_retained_names_come_from_the_template(planned: PlannedStacks, config: ClusterConfig) -> None:
    names = {(r.kind, r.name) for r in planned.retained_names(ACCOUNT, REGION)}
    assert ("AWS::SecretsManager::Secret", config.pki_secret_name) in names
    assert ("AWS::DynamoDB::Table", config.cluster_state_table_name) in names
    assert ("AWS::S3::Bucket", config.snapshot_bucket_name(ACCOUNT, REGION)) in names  # Fn::Join resolved


def test_leftovers_of_a_rolled_back_attempt_fail(
    aws_account: None, planned: PlannedStacks, config: ClusterConfig
) -> None:
    """A rolled-back create leaves the resources with DeletionPolicy Retain; a retry's create of the same name
    fails (AlreadyExists). A deleted secret keeps its name until its recovery window ends (Delete an AWS Secrets
    Manager secret, Secrets Manager user guide)."""
    aws = boto3_clients(REGION)
    assert check_leftover_resources(aws, planned, ACCOUNT, REGION).status == "ok"
    secrets = boto3.client("secretsmanager", region_name=REGION)
    secrets.create_secret(Name=config.pki_secret_name, SecretString="{}")
    secrets.delete_secret(SecretId=config.pki_secret_name)
    boto3.client("dynamodb", region_name=REGION).create_table(
        TableName=config.cluster_state_table_name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=config.snapshot_bucket_name(ACCOUNT, REGION))
    result = check_leftover_resources(aws, planned, ACCOUNT, REGION)
    assert result.status == "FAIL"
    assert f"secret {config.pki_secret_name} (scheduled for deletion)" in result.found
    assert f"table {config.cluster_state_table_name}" in result.found
    assert f"bucket {config.snapshot_bucket_name(ACCOUNT, REGION)}" in result.found
    assert "--force-delete-without-recovery" in result.action


def test_resources_the_stack_owns_are_not_leftovers(
    aws_account: None, planned: PlannedStacks, config: ClusterConfig
) -> None:
    """On an update the named resources exist and belong to the stack (ListStackResources)."""
    cluster_stack = next(name for name in planned.templates if name.endswith("-cluster"))
    template = {
        "Resources": {
            "Table": {
                "Type": "AWS::DynamoDB::Table",
                "Properties": {
                    "TableName": config.cluster_state_table_name,
                    "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
                    "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
                    "BillingMode": "PAY_PER_REQUEST",
                },
            }
        }
    }
    boto3.client("cloudformation", region_name=REGION).create_stack(
        StackName=cluster_stack, TemplateBody=json.dumps(template)
    )
    assert check_leftover_resources(boto3_clients(REGION), planned, ACCOUNT, REGION).status == "ok"


# --- the command ----------------------------------------------------------------------------------------


def write_assembly(planned: PlannedStacks, directory: Path) -> Path:
    """A cloud assembly as CDK writes one: manifest.json naming each stack's template file."""
    directory.mkdir(parents=True)
    artifacts = {}
    for index, (stack, template) in enumerate(planned.templates.items()):
        (directory / f"stack{index}.template.json").write_text(json.dumps(template))
        artifacts[f"Stack{index}"] = {
            "type": "aws:cloudformation:stack",
            "properties": {"templateFile": f"stack{index}.template.json", "stackName": stack},
        }
    (directory / "manifest.json").write_text(json.dumps({"version": "1", "artifacts": artifacts}))
    return directory


def ready_account(config: ClusterConfig, service_linked_role: bool = True) -> None:
    """Everything a first deploy of the default configuration needs, nothing left over."""
    if service_linked_role:
        boto3.client("iam").create_service_linked_role(AWSServiceName="autoscaling.amazonaws.com")
    put_ami_parameter(config, make_ami(config.kubernetes_version))
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name="/cdk-bootstrap/hnb659fds/version", Value="30", Type="String"
    )


def run(argv: list[str], aws: Clients) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, aws=aws, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_the_command_passes_on_a_ready_account(
    aws_account: None, planned: PlannedStacks, config: ClusterConfig, tmp_path: Path
) -> None:
    ready_account(config)
    assembly = write_assembly(planned, tmp_path / "cdk.out")
    code, out, err = run(
        ["--region", REGION, "--account", ACCOUNT, "--assembly", str(assembly)], clients_with_lambda_quota(1000)
    )
    assert code == 0, out
    names = [
        "credentials", "availability-zones", "dedicated-tenancy", "ami", "lambda-concurrency",
        "autoscaling-service-linked-role", "s3-block-public-access", "cdk-bootstrap", "leftover-resources",
    ]  # fmt: skip
    for name in names:
        assert f"[preflight] {name}: " in err and f"[preflight] {name}: ok" in err  # one progress line, then the result
        assert any(line.split()[:2] == [name, "ok"] for line in out.splitlines())
    assert "imported-vpc" not in out  # only with vpcId
    assert out.rstrip().endswith("preflight passed")


def test_the_command_fails_and_prints_what_to_do_json(
    aws_account: None, planned: PlannedStacks, config: ClusterConfig, tmp_path: Path
) -> None:
    ready_account(config, service_linked_role=False)
    assembly = write_assembly(planned, tmp_path / "cdk.out")
    argv = ["--region", REGION, "--assembly", str(assembly)]
    code, out, _ = run(argv, clients_with_lambda_quota(1000))
    assert code == 1
    assert "what to do:\n  autoscaling-service-linked-role: set context createAutoScalingServiceLinkedRole=true" in out
    assert out.rstrip().endswith("preflight FAILED: autoscaling-service-linked-role")

    code, out, _ = run([*argv, "-o", "json"], clients_with_lambda_quota(None))  # lambda: AccessDenied
    document = json.loads(out)
    assert code == 1
    assert set(document) == {"ok", "cluster", "account", "region", "checks"}
    assert document["ok"] is False and document["account"] == ACCOUNT and document["region"] == REGION
    by_name = {c["name"]: c for c in document["checks"]}
    assert all(set(c) == {"name", "status", "found", "action"} for c in document["checks"])
    assert by_name["autoscaling-service-linked-role"]["status"] == "FAIL"
    assert by_name["lambda-concurrency"]["status"] == "FAIL"
    assert by_name["lambda-concurrency"]["found"].startswith("GetAccountSettings failed: AccessDeniedException")
    assert "lambda:GetAccountSettings" in by_name["lambda-concurrency"]["action"]
    assert by_name["ami"] == {"name": "ami", "status": "ok", "found": by_name["ami"]["found"], "action": ""}


def test_credentials_of_another_account_stop_every_other_check(
    aws_account: None, planned: PlannedStacks, tmp_path: Path
) -> None:
    assembly = write_assembly(planned, tmp_path / "cdk.out")
    code, out, err = run(
        ["--region", REGION, "--account", "111111111111", "--assembly", str(assembly)], clients_with_lambda_quota(1000)
    )
    assert code == 1
    assert "in account 123456789012, not 111111111111" in out
    assert "lambda-concurrency" not in err + out


def test_bad_context_names_the_key_and_calls_nothing(aws_account: None) -> None:
    def no_calls(service: str) -> Any:
        raise AssertionError(f"called {service} on bad input")

    code, _, err = run(["--region", REGION, "--context", "controlPlaneCount=4"], no_calls)
    assert code == 2 and "'controlPlaneCount' = 4" in err
    code, _, err = run(["--region", REGION, "--context", "controlPlaneCount"], no_calls)
    assert code == 2 and "--context 'controlPlaneCount': must be key=value" in err


def test_a_stage_reads_the_pipelines_stage_configuration() -> None:
    context = read_context([])
    staging = load_config(dict(context), "staging", None, None)
    assert staging.cluster_name == context["stagingClusterName"]
    assert staging.worker_groups[0].max_size == context["stagingOverrides"]["workerGroups"][0]["maxSize"]
    with pytest.raises(ValueError, match="--region eu-west-1: the staging stage deploys to us-east-1"):
        load_config(dict(context), "staging", "eu-west-1", None)


def test_read_actions_are_reads() -> None:
    verbs = ("Describe", "Get", "List")
    assert all(action.split(":")[1].startswith(verbs) for action in READ_ACTIONS), READ_ACTIONS


def test_no_credentials_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's own credential chain with nothing in it: no keys, no files, no instance metadata."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    out, err = io.StringIO(), io.StringIO()
    code = main(["--region", REGION], stdout=out, stderr=err)
    assert code == 2 and out.getvalue() == ""
    assert err.getvalue().strip() == "preflight: cannot call AWS with these credentials: Unable to locate credentials"
