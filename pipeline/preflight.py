"""``python -m pipeline.preflight``: read-only checks of the target account before anything is deployed.

    python -m pipeline.preflight --region us-east-1 [--account 111111111111] [--context key=value ...]
    python -m pipeline.preflight --stage staging --assembly cdk.out/assembly-PipelineStack-Staging   (the pipeline)

The configuration is the app's (``stages/config.py`` ``ClusterConfig`` from ``cdk.json`` context plus
``--context`` overrides, or a pipeline stage's through ``pipeline/config.py``); what the stacks will create or
reserve comes from their synthesized templates (``pipeline/preflight_template.py``). Every check prints a
progress line, then one table row: ``ok`` / ``warn`` / ``FAIL``, what it found and what to do. Any FAIL exits 1;
``-o json`` prints the same rows for machines. Every call is a read (``READ_ACTIONS``: the pipeline's preflight
role is granted exactly these).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from pipeline.preflight_template import (
    AUTOSCALING_ROLE_NAME,
    AUTOSCALING_SERVICE,
    NamedResource,
    PlannedStacks,
    from_assembly,
    synthesize,
)
from pipeline.table import format_table
from stages.config import ClusterConfig, ConfigError, VpcConfig

ROOT = Path(__file__).resolve().parent.parent
# The IAM actions behind every call below (s3control:GetPublicAccessBlock is authorised as
# s3:GetAccountPublicAccessBlock; S3 HeadBucket as s3:ListBucket). sts:GetCallerIdentity needs no permission.
READ_ACTIONS = (
    "cloudformation:ListStackResources",
    "dynamodb:DescribeTable",
    "ec2:DescribeAvailabilityZones",
    "ec2:DescribeImages",
    "ec2:DescribeInstanceTypeOfferings",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeRouteTables",
    "ec2:DescribeSubnets",
    "ec2:DescribeVpcAttribute",
    "ec2:DescribeVpcs",
    "iam:GetRole",
    "lambda:GetAccountSettings",
    "logs:DescribeLogGroups",
    "s3:GetAccountPublicAccessBlock",
    "s3:ListBucket",
    "secretsmanager:DescribeSecret",
    "ssm:GetParameter",
)
# Lambda keeps this much of the account's concurrency unreserved (all of it when the quota is smaller).
UNRESERVED_FLOOR = 100
AMI_VERSION_TAG = "dedicated-k8s:kubernetes-version"  # stages/image_stack.py's AmiTags

Clients = Callable[[str], Any]  # AWS service name -> boto3 client


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # "ok" | "warn" | "FAIL"
    found: str
    action: str = ""  # what the operator does about it (empty when there is nothing to do)


def ok(name: str, found: str) -> CheckResult:
    return CheckResult(name, "ok", found)


def fail(name: str, found: str, action: str) -> CheckResult:
    return CheckResult(name, "FAIL", found, action)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


# --- the checks ------------------------------------------------------------------------------------


def check_lambda_concurrency(aws: Clients, reserved: Mapping[str, int]) -> CheckResult:
    """The functions' reservations fit the account: Lambda refuses one that leaves less than 100 unreserved."""
    name = "lambda-concurrency"
    limit = aws("lambda").get_account_settings()["AccountLimit"]
    quota, unreserved = int(limit["ConcurrentExecutions"]), int(limit["UnreservedConcurrentExecutions"])
    asked = sum(reserved.values())
    reservable = max(0, unreserved - min(UNRESERVED_FLOOR, quota))
    found = f"quota {quota}, unreserved {unreserved}; the stacks reserve {asked}"
    if asked <= reservable:
        return ok(name, found + (f" (of {reservable} reservable)" if asked else ""))
    functions = ", ".join(f"{k}={v}" for k, v in sorted(reserved.items()))
    return fail(
        name,
        f"{found} ({functions}), but only {reservable} can be reserved: Lambda keeps "
        f"{min(UNRESERVED_FLOOR, quota)} unreserved",
        "request a higher 'Concurrent executions' quota (Service Quotas, AWS Lambda, L-B99A9384) of at least "
        f"{asked + UNRESERVED_FLOOR}, or deploy a template without these reservations",
    )


def check_autoscaling_service_linked_role(aws: Clients, planned: PlannedStacks, config: ClusterConfig) -> CheckResult:
    """AWSServiceRoleForAutoScaling exists unless the stacks create it (and not twice if they do)."""
    name = "autoscaling-service-linked-role"
    creates = planned.creates_service_linked_role(AUTOSCALING_SERVICE) or bool(
        getattr(config, "create_auto_scaling_service_linked_role", False)
    )
    keys = planned.key_policies_name(AUTOSCALING_ROLE_NAME)
    try:
        role = aws("iam").get_role(RoleName=AUTOSCALING_ROLE_NAME)["Role"]
    except ClientError as error:
        if _code(error) != "NoSuchEntity":
            raise
        role = None
    if role is not None and creates:
        return fail(
            name,
            f"{AUTOSCALING_ROLE_NAME} exists and the stacks create it (createAutoScalingServiceLinkedRole=true)",
            "set context createAutoScalingServiceLinkedRole=false: creating a service-linked role that exists fails",
        )
    if role is not None:
        return ok(name, f"{role['Arn']} exists")
    if creates:
        return ok(name, f"{AUTOSCALING_ROLE_NAME} absent; the stacks create it (createAutoScalingServiceLinkedRole)")
    if not keys:
        return ok(name, f"{AUTOSCALING_ROLE_NAME} absent; no key policy of the stacks names it")
    return fail(
        name,
        f"{AUTOSCALING_ROLE_NAME} does not exist, and the key policy of {', '.join(keys)} names it "
        "(KMS rejects a policy whose principal does not exist)",
        "set context createAutoScalingServiceLinkedRole=true, or run: aws iam create-service-linked-role "
        f"--aws-service-name {AUTOSCALING_SERVICE}",
    )


def check_s3_block_public_access(aws: Clients, account: str, irsa: bool) -> CheckResult:
    """With IRSA on, the account's S3 Block Public Access must allow the issuer bucket's public-read policy."""
    name = "s3-block-public-access"
    try:
        block = aws("s3control").get_public_access_block(AccountId=account)["PublicAccessBlockConfiguration"]
    except ClientError as error:
        if _code(error) != "NoSuchPublicAccessBlockConfiguration":
            raise
        block = {}
    on = [key for key in ("BlockPublicPolicy", "RestrictPublicBuckets") if block.get(key)]
    found = f"account Block Public Access: {', '.join(k for k, v in sorted(block.items()) if v) or 'none'}"
    if not irsa:
        return ok(name, f"{found} (irsa=false: no public bucket needed)")
    if not on:
        return ok(name, f"{found}; the IRSA issuer bucket's public-read policy is allowed")
    return fail(
        name,
        f"{found}: {' and '.join(on)} stop the IRSA issuer bucket's public-read policy "
        "(STS fetches the discovery document and JWKS anonymously)",
        f"either turn {' and '.join(on)} off at the account level (every other bucket keeps its own bucket-level "
        "block; the stack makes exactly two objects public, see docs/irsa.md), or deploy with -c irsa=false "
        "(no IAM Roles for Service Accounts)",
    )


def check_availability_zones(aws: Clients, zones: Sequence[str]) -> CheckResult:
    name = "availability-zones"
    listed = aws("ec2").describe_availability_zones()["AvailabilityZones"]
    state = {z["ZoneName"]: z.get("State", "") for z in listed}
    missing = [z for z in zones if z not in state]
    unavailable = [f"{z} ({state[z]})" for z in zones if z in state and state[z] != "available"]
    if not missing and not unavailable:
        return ok(name, f"{', '.join(zones)} available")
    problems = ([f"not in the region: {', '.join(missing)}"] if missing else []) + (
        [f"not available: {', '.join(unavailable)}"] if unavailable else []
    )
    usable = ", ".join(z for z, s in sorted(state.items()) if s == "available")
    return fail(name, "; ".join(problems), f"set availabilityZones to available zones of the region ({usable})")


def check_dedicated_tenancy(aws: Clients, config: ClusterConfig) -> CheckResult:
    """Every configured instance type is offered in every configured AZ (DescribeInstanceTypeOfferings)."""
    name = "dedicated-tenancy"
    types = sorted({config.control_plane_instance_type, *(g.instance_type for g in config.worker_groups)})
    ec2 = aws("ec2")
    try:
        ec2.describe_instance_types(InstanceTypes=types)
    except ClientError as error:
        if _code(error) != "InvalidInstanceType":
            raise
        return fail(name, str(error), "use instance types that exist (controlPlaneInstanceType, workerGroups)")
    paginator = ec2.get_paginator("describe_instance_type_offerings")
    offered = {
        (o["InstanceType"], o["Location"])
        for page in paginator.paginate(
            LocationType="availability-zone",
            Filters=[
                {"Name": "instance-type", "Values": types},
                {"Name": "location", "Values": list(config.availability_zones)},
            ],
        )
        for o in page["InstanceTypeOfferings"]
    }
    missing = [f"{t} in {z}" for t in types for z in config.availability_zones if (t, z) not in offered]
    found = f"{', '.join(types)} offered in {', '.join(config.availability_zones)}"
    if not missing:
        # No EC2 API reports per type whether it runs as a Dedicated Instance: the family rule is the config's.
        tenancy = f"; tenancy {config.tenancy}" + (
            " (family allowed: stages/config.py)" if config.tenancy == "dedicated" else ""
        )
        return ok(name, found + tenancy)
    return fail(
        name,
        f"not offered: {', '.join(missing)}",
        "choose zones that offer every type (availabilityZones), or types offered in every zone "
        "(aws ec2 describe-instance-type-offerings --location-type availability-zone)",
    )


def check_ami(aws: Clients, config: ClusterConfig) -> CheckResult:
    """The AMI (through its SSM parameter) exists, is available and carries the configured Kubernetes version."""
    name = "ami"
    build = "build it: npx cdk deploy ImageStack, then scripts/build-k8s-ami-imagebuilder.sh (it writes the parameter)"
    image_id = config.ami
    where = ""
    if config.ami_is_ssm_parameter:
        try:
            image_id = aws("ssm").get_parameter(Name=config.ami)["Parameter"]["Value"]
        except ClientError as error:
            if _code(error) != "ParameterNotFound":
                raise
            return fail(name, f"SSM parameter {config.ami} does not exist", build)
        where = f"{config.ami} -> "
    try:
        images = aws("ec2").describe_images(ImageIds=[image_id])["Images"]
    except ClientError as error:
        if not _code(error).startswith("InvalidAMIID."):  # .NotFound, .Malformed
            raise
        images = []
    if not images:
        return fail(name, f"{where}{image_id}: no such image in this account and region", build)
    image = images[0]
    tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
    version = tags.get(AMI_VERSION_TAG)
    carries = (
        version == config.kubernetes_version
        if version
        else f"kubernetes-{config.kubernetes_version}-" in image.get("Name", "")
    )
    found = f"{where}{image_id} ({image.get('Name', '?')}, {image.get('State', '?')}, {AMI_VERSION_TAG}={version})"
    if image.get("State") != "available":
        return fail(name, found, "wait for the image to become available, or rebuild it")
    if not carries:
        return fail(
            name,
            f"{found}: not Kubernetes {config.kubernetes_version}",
            f"bake an AMI for {config.kubernetes_version} (imagebuilder/versions.json), or point 'ami' at one",
        )
    return ok(name, found)


def check_imported_vpc(aws: Clients, vpc: VpcConfig, zones: Sequence[str]) -> CheckResult:
    """An imported VPC is private: one subnet per AZ, no public IPs, no internet gateway route, the given CIDR."""
    name = "imported-vpc"
    ec2 = aws("ec2")
    try:
        (described,) = ec2.describe_vpcs(VpcIds=[vpc.vpc_id])["Vpcs"]
    except ClientError as error:
        if _code(error) != "InvalidVpcID.NotFound":
            raise
        return fail(name, f"{vpc.vpc_id} does not exist in this account and region", "set vpcId to an existing VPC")
    problems = []
    if described["CidrBlock"] != vpc.cidr:
        problems.append(f"CIDR is {described['CidrBlock']}, vpcCidr says {vpc.cidr}")
    for attribute, key in (("enableDnsSupport", "EnableDnsSupport"), ("enableDnsHostnames", "EnableDnsHostnames")):
        if not ec2.describe_vpc_attribute(VpcId=vpc.vpc_id, Attribute=attribute)[key]["Value"]:
            problems.append(f"{attribute} is off (private DNS of the interface endpoints needs it)")
    subnets = {s["SubnetId"]: s for s in ec2.describe_subnets(SubnetIds=list(vpc.private_subnet_ids))["Subnets"]}
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc.vpc_id]}])["RouteTables"]
    main = next((t for t in tables if any(a.get("Main") for a in t.get("Associations", []))), None)
    by_subnet = {a["SubnetId"]: t for t in tables for a in t.get("Associations", []) if a.get("SubnetId")}
    subnet_zones = sorted(s["AvailabilityZone"] for s in subnets.values())
    if subnet_zones != sorted(zones):
        problems.append(
            f"subnets are in {', '.join(subnet_zones)}; one per configured AZ ({', '.join(zones)}) is needed"
        )
    for subnet_id, route_table_id in zip(vpc.private_subnet_ids, vpc.private_route_table_ids, strict=True):
        subnet = subnets[subnet_id]
        if subnet["VpcId"] != vpc.vpc_id:
            problems.append(f"{subnet_id} is in {subnet['VpcId']}")
        if subnet.get("MapPublicIpOnLaunch"):
            problems.append(f"{subnet_id} maps public IPs on launch")
        table = by_subnet.get(subnet_id, main)
        if table is None or table["RouteTableId"] != route_table_id:
            actual = table["RouteTableId"] if table else "none"
            problems.append(f"{subnet_id} routes through {actual}, privateRouteTableIds says {route_table_id}")
        if table is not None:
            gateways = [r["GatewayId"] for r in table.get("Routes", []) if r.get("GatewayId", "").startswith("igw-")]
            if gateways:
                problems.append(f"{table['RouteTableId']} ({subnet_id}) routes to internet gateway {gateways[0]}")
    found = f"{vpc.vpc_id} {described['CidrBlock']}, subnets {', '.join(vpc.private_subnet_ids)}"
    if not problems:
        return ok(name, f"{found}: private, one subnet per AZ")
    return fail(
        name,
        "; ".join(dict.fromkeys(problems)),
        "import private subnets (no internet gateway route, MapPublicIpOnLaunch off), one per AZ, each with its own "
        "route table in privateRouteTableIds, and the VPC's CIDR as vpcCidr",
    )


def check_cdk_bootstrap(aws: Clients, planned: PlannedStacks) -> CheckResult:
    """`cdk deploy` needs the bootstrap stack; the templates' CheckBootstrapVersion rule names the minimum."""
    name = "cdk-bootstrap"
    requirement = planned.bootstrap_requirement()
    if requirement is None:
        return ok(name, "the templates require no bootstrap version")
    parameter, minimum = requirement
    try:
        value = aws("ssm").get_parameter(Name=parameter)["Parameter"]["Value"]
    except ClientError as error:
        if _code(error) != "ParameterNotFound":
            raise
        value = None
    if value is not None and value.isdigit() and int(value) >= minimum:
        return ok(name, f"{parameter} = {value} (>= {minimum})")
    found = (
        f"{parameter} {'does not exist' if value is None else f'= {value}'}; the templates need version >= {minimum}"
    )
    return fail(name, found, "run: npx cdk bootstrap aws://<account>/<region> (with this repository's CDK CLI)")


def _owned_by_stacks(aws: Clients, stacks: Sequence[str]) -> set[str]:
    """Physical IDs the stacks own now (a deleted or retained-on-rollback resource is no longer theirs)."""
    owned: set[str] = set()
    cloudformation = aws("cloudformation")
    for stack in stacks:
        try:
            pages = cloudformation.get_paginator("list_stack_resources").paginate(StackName=stack)
            for page in pages:
                for r in page["StackResourceSummaries"]:
                    if r.get("ResourceStatus") not in ("DELETE_COMPLETE", "DELETE_SKIPPED"):
                        owned.add(r.get("PhysicalResourceId", ""))
        except ClientError as error:
            if _code(error) != "ValidationError":  # "Stack with id ... does not exist"
                raise
    return owned


def _secret(aws: Clients, name: str) -> tuple[str, str]:
    secret = aws("secretsmanager").describe_secret(SecretId=name)
    return secret["ARN"], f"secret {name}" + (" (scheduled for deletion)" if secret.get("DeletedDate") else "")


def _table(aws: Clients, name: str) -> tuple[str, str]:
    aws("dynamodb").describe_table(TableName=name)
    return name, f"table {name}"


def _bucket(aws: Clients, name: str) -> tuple[str, str]:
    try:
        aws("s3").head_bucket(Bucket=name)
    except ClientError as error:
        if _code(error) != "403":
            raise
        return name, f"bucket {name} (not this account's)"  # bucket names are global
    return name, f"bucket {name}"


def _log_group(aws: Clients, name: str) -> tuple[str, str] | None:
    groups = aws("logs").describe_log_groups(logGroupNamePrefix=name)["logGroups"]
    return (name, f"log group {name}") if any(g["logGroupName"] == name for g in groups) else None


# Resource type -> (physical ID CloudFormation records for it, what is there), or an error/None when absent.
_LOOKUPS: dict[str, Callable[[Clients, str], tuple[str, str] | None]] = {
    "AWS::SecretsManager::Secret": _secret,
    "AWS::DynamoDB::Table": _table,
    "AWS::S3::Bucket": _bucket,
    "AWS::Logs::LogGroup": _log_group,
}
_ABSENT = ("ResourceNotFoundException", "404", "NoSuchBucket")


def _existing(aws: Clients, resource: NamedResource) -> tuple[str, str] | None:
    try:
        return _LOOKUPS[resource.kind](aws, resource.name)
    except ClientError as error:
        if _code(error) in _ABSENT:
            return None
        raise


def check_leftover_resources(aws: Clients, planned: PlannedStacks, account: str, region: str) -> CheckResult:
    """No fixed-name resource the stacks retain exists outside them (left by an earlier attempt or a deleted stack)."""
    name = "leftover-resources"
    named = planned.retained_names(account, region)
    owned = _owned_by_stacks(aws, sorted(planned.templates))
    leftovers = []
    for resource in named:
        existing = _existing(aws, resource)
        if existing is not None and existing[0] not in owned:
            leftovers.append(existing[1])
    if not leftovers:
        return ok(name, f"none of the {len(named)} retained names exists outside the stacks")
    return fail(
        name,
        f"already exist outside the stacks: {', '.join(leftovers)} (CloudFormation fails with AlreadyExists)",
        "these hold cluster state of an earlier attempt: back up what you need, then delete them (a secret scheduled "
        "for deletion: aws secretsmanager delete-secret --force-delete-without-recovery), or use another clusterName",
    )


def check_credentials(aws: Clients, account: str) -> CheckResult:
    name = "credentials"
    identity = aws("sts").get_caller_identity()
    if identity["Account"] == account:
        return ok(name, f"{identity['Arn']} in {account}")
    return fail(
        name,
        f"the credentials are {identity['Arn']} in account {identity['Account']}, not {account}",
        "use credentials of the target account (AWS_PROFILE), or pass the account they belong to",
    )


# --- running them ------------------------------------------------------------------------------------


def run_checks(
    config: ClusterConfig, planned: PlannedStacks, aws: Clients, account: str, progress: Callable[[str], None]
) -> list[CheckResult]:
    """Every check, in order; a failed call becomes that check's FAIL (naming the call), the others still run."""
    zones = config.availability_zones
    checks: list[tuple[str, str, Callable[[], CheckResult]]] = [
        ("availability-zones", "ec2:DescribeAvailabilityZones", partial(check_availability_zones, aws, zones)),
        ("dedicated-tenancy", "ec2:DescribeInstanceType(Offering)s", partial(check_dedicated_tenancy, aws, config)),
        ("ami", "ssm:GetParameter, ec2:DescribeImages", partial(check_ami, aws, config)),
    ]
    if config.vpc.imported:
        checks.append(
            (
                "imported-vpc",
                "ec2:DescribeVpcs/Subnets/RouteTables",
                partial(check_imported_vpc, aws, config.vpc, zones),
            )
        )
    reserved = planned.reserved_concurrency()
    checks += [
        ("lambda-concurrency", "lambda:GetAccountSettings", partial(check_lambda_concurrency, aws, reserved)),
        (
            "autoscaling-service-linked-role",
            "iam:GetRole",
            partial(check_autoscaling_service_linked_role, aws, planned, config),
        ),
        (
            "s3-block-public-access",
            "s3control:GetPublicAccessBlock",
            partial(check_s3_block_public_access, aws, account, config.irsa),
        ),
        ("cdk-bootstrap", "ssm:GetParameter", partial(check_cdk_bootstrap, aws, planned)),
        (
            "leftover-resources",
            "cloudformation/secretsmanager/dynamodb/s3/logs",
            partial(check_leftover_resources, aws, planned, account, config.region),
        ),
    ]
    credentials = _guarded("credentials", "sts:GetCallerIdentity", partial(check_credentials, aws, account), progress)
    if credentials.status == "FAIL":
        return [credentials]  # every other answer would describe another account
    return [credentials, *(_guarded(name, calls, check, progress) for name, calls, check in checks)]


def _guarded(name: str, calls: str, check: Callable[[], CheckResult], progress: Callable[[str], None]) -> CheckResult:
    progress(f"{name}: {calls} ...")
    try:
        result = check()
    except ClientError as error:
        operation = error.operation_name
        result = fail(
            name,
            f"{operation} failed: {_code(error)}: {error.response.get('Error', {}).get('Message', '')}",
            f"allow these credentials the read-only {calls} (pipeline/preflight.py READ_ACTIONS), then rerun",
        )
    except BotoCoreError as error:
        result = fail(name, f"the call failed: {error}", "check the network path and credentials to AWS, then rerun")
    progress(f"{name}: {result.status}")
    return result


def format_results(results: Sequence[CheckResult]) -> str:
    rows = [("CHECK", "RESULT", "FOUND"), *((r.name, r.status, r.found) for r in results)]
    todo = [f"  {r.name}: {r.action}" for r in results if r.action]
    return format_table(rows) + ("\n\nwhat to do:\n" + "\n".join(todo) if todo else "")


def boto3_clients(region: str, role_arn: str | None = None) -> Clients:
    """boto3 clients of ``region`` from the environment's credentials, or from ``role_arn`` assumed with them."""
    import boto3

    session = boto3.Session(region_name=region)
    if role_arn is not None:
        credentials = session.client("sts").assume_role(RoleArn=role_arn, RoleSessionName="dedicated-k8s-preflight")[
            "Credentials"
        ]
        session = boto3.Session(
            region_name=region,
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"],
        )
    made: dict[str, Any] = {}

    def client(service: str) -> Any:
        if service not in made:
            made[service] = session.client(service)
        return made[service]

    return client


def read_context(overrides: Sequence[str], cdk_json: Path = ROOT / "cdk.json") -> dict[str, Any]:
    """cdk.json's context with ``key=value`` overrides on top, as strings (exactly as ``cdk -c`` passes them)."""
    context = dict(json.loads(cdk_json.read_text())["context"])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--context {item!r}: must be key=value"])
        context[key] = value
    return context


def load_config(context: dict[str, Any], stage: str | None, region: str | None, account: str | None) -> ClusterConfig:
    """The app's ClusterConfig (or a pipeline stage's): ``--region``/``--account`` act as context overrides."""
    if stage is None:
        if region is not None:
            context["region"] = region
        if account is not None:
            context["account"] = account
        return ClusterConfig.from_context(context.get, given_keys=context)  # a misspelt key is refused, as by the app
    from pipeline.config import PipelineSettings

    settings = PipelineSettings.from_context(context.get)
    config = settings.staging.config if stage == "staging" else settings.production.config
    assert config is not None  # PipelineSettings.from_context builds both stages' configuration
    for flag, given, stage_value in (("--region", region, config.region), ("--account", account, config.account)):
        if given is not None and stage_value is not None and given != stage_value:
            raise ConfigError([f"{flag} {given}: the {stage} stage deploys to {stage_value} ({stage}Region/Account)"])
    return config


def main(argv: Sequence[str] | None = None, *, aws: Clients | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:  # fmt: skip
    out, err = stdout or sys.stdout, stderr or sys.stderr
    parser = argparse.ArgumentParser(prog="python -m pipeline.preflight", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--region", help="target region (default: the configuration's region)")
    parser.add_argument("--account", help="target account (default: the configuration's, else the credentials')")
    parser.add_argument("--context", action="append", default=[], metavar="KEY=VALUE", help="as cdk -c; repeatable")
    parser.add_argument("--stage", choices=("staging", "production"), help="check a pipeline stage's cluster")
    parser.add_argument("--assembly", type=Path, help="read the templates from this cloud assembly, not a synthesis")
    parser.add_argument("--role-arn", help="assume this (read-only) role first, e.g. the target's CDK lookup role")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(f"[preflight] {line}", file=err, flush=True)

    try:
        context = read_context(args.context)
        config = load_config(context, args.stage, args.region, args.account)
        if aws is None:
            aws = boto3_clients(config.region, args.role_arn)
        account = config.account or args.account or str(aws("sts").get_caller_identity()["Account"])
        progress(f"cluster {config.cluster_name}, account {account}, region {config.region}: reading the templates")
        planned = from_assembly(args.assembly) if args.assembly else synthesize(config, context)
    except (ConfigError, ValueError) as error:
        print(f"preflight: {error}", file=err)
        return 2
    except (BotoCoreError, ClientError) as error:  # no credentials, or not allowed to assume --role-arn
        print(f"preflight: cannot call AWS with these credentials: {error}", file=err)
        return 2
    results = run_checks(config, planned, aws, account, progress)
    failed = [r.name for r in results if r.status == "FAIL"]
    if args.output == "json":
        document = {
            "ok": not failed,
            "cluster": config.cluster_name,
            "account": account,
            "region": config.region,
            "checks": [asdict(r) for r in results],
        }
        print(json.dumps(document, indent=2), file=out)
    else:
        print(format_results(results), file=out)
        print(f"\npreflight {'FAILED: ' + ', '.join(failed) if failed else 'passed'}", file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
