"""How each resource type of the cluster template is created in the twin's moto (one function per type).

Each creator gets the resolved properties' raw form, creates the resource with the API call CloudFormation
makes for it, and returns its ``Ref`` value and the ``Fn::GetAtt`` attributes (as the CloudFormation
resource reference documents them for that type: "AWS resource and property types reference", Return
values). Deviations from CloudFormation are said where they are.
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from twin.aws import ACCOUNT, PARTITION, REGION
from twin.template import (
    ROLE_TAG_KEY,
    URL_SUFFIX,
    EventSourceSpec,
    GroupSpec,
    HookSpec,
    LambdaSpec,
    RuleSpec,
    TargetGroupSpec,
    TemplateCloud,
    TemplateError,
    _Made,
    agent_config_from_user_data,
    creates,
)


def _tags(props: dict[str, Any]) -> list[dict[str, str]]:
    return TemplateCloud.tags(props)


# -- network ---------------------------------------------------------------------------------------------------
@creates("AWS::EC2::VPC")
def vpc(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    cidr = cloud.addresses.to_twin(cloud.resolve(props["CidrBlock"]))
    spec = [{"ResourceType": "vpc", "Tags": _tags(cloud.resolve(props))}] if props.get("Tags") else []
    vpc_id = cloud.client("ec2").create_vpc(CidrBlock=cidr, TagSpecifications=spec)["Vpc"]["VpcId"]
    return _Made(vpc_id, {"CidrBlock": cidr, "VpcId": vpc_id, "DefaultSecurityGroup": ""})


@creates("AWS::EC2::Subnet")
def subnet(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    sub = cloud.client("ec2").create_subnet(
        VpcId=p["VpcId"],
        CidrBlock=cloud.addresses.to_twin(p["CidrBlock"]),
        AvailabilityZone=p["AvailabilityZone"],
        TagSpecifications=[{"ResourceType": "subnet", "Tags": _tags(p)}] if p.get("Tags") else [],
    )["Subnet"]
    attrs = {"AvailabilityZone": p["AvailabilityZone"], "SubnetId": sub["SubnetId"], "CidrBlock": sub["CidrBlock"]}
    return _Made(sub["SubnetId"], attrs)


@creates("AWS::EC2::RouteTable")
def route_table(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    rtb = cloud.client("ec2").create_route_table(VpcId=p["VpcId"])["RouteTable"]["RouteTableId"]
    return _Made(rtb, {"RouteTableId": rtb})


@creates("AWS::EC2::SubnetRouteTableAssociation")
def route_table_association(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    assoc = cloud.client("ec2").associate_route_table(RouteTableId=p["RouteTableId"], SubnetId=p["SubnetId"])
    return _Made(assoc["AssociationId"])


@creates("AWS::EC2::SecurityGroup")
def security_group(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    ec2 = cloud.client("ec2")
    group_id = ec2.create_security_group(
        GroupName=p.get("GroupName", f"twin-{lid}"), Description=p["GroupDescription"], VpcId=p["VpcId"]
    )["GroupId"]
    for rule in p.get("SecurityGroupIngress", []):
        _rule(cloud, "ingress", {**rule, "GroupId": group_id})
    egress = p.get("SecurityGroupEgress")
    if egress is not None:  # an explicit egress list replaces EC2's default allow-all rule
        ec2.revoke_security_group_egress(
            GroupId=group_id, IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
        )
        for rule in egress:
            _rule(cloud, "egress", {**rule, "GroupId": group_id})
    return _Made(group_id, {"GroupId": group_id, "VpcId": p["VpcId"]})


def _rule(cloud: TemplateCloud, direction: str, p: dict[str, Any]) -> None:
    permission: dict[str, Any] = {"IpProtocol": str(p["IpProtocol"])}
    if "FromPort" in p:
        permission |= {"FromPort": int(p["FromPort"]), "ToPort": int(p["ToPort"])}
    if "CidrIp" in p:
        permission["IpRanges"] = [
            {"CidrIp": cloud.addresses.to_twin(p["CidrIp"]), "Description": p.get("Description", "")}
        ]
    for key in ("SourceSecurityGroupId", "DestinationSecurityGroupId"):
        if key in p:
            permission["UserIdGroupPairs"] = [{"GroupId": p[key], "Description": p.get("Description", "")}]
    if "DestinationPrefixListId" in p:
        permission["PrefixListIds"] = [{"PrefixListId": p["DestinationPrefixListId"]}]
    ec2 = cloud.client("ec2")
    call = ec2.authorize_security_group_ingress if direction == "ingress" else ec2.authorize_security_group_egress
    call(GroupId=p["GroupId"], IpPermissions=[permission])


@creates("AWS::EC2::SecurityGroupIngress", "AWS::EC2::SecurityGroupEgress")
def security_group_rule(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    kind = cloud.resources[lid]["Type"]
    _rule(cloud, "ingress" if kind.endswith("Ingress") else "egress", cloud.resolve(props))
    return _Made(f"twin-rule-{lid}")


@creates("AWS::EC2::VPCEndpoint")
def vpc_endpoint(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    args: dict[str, Any] = {
        "VpcId": p["VpcId"],
        "ServiceName": p["ServiceName"],
        "VpcEndpointType": p.get("VpcEndpointType", "Gateway"),
    }
    for key in ("SubnetIds", "SecurityGroupIds", "RouteTableIds", "PrivateDnsEnabled"):
        if key in p:
            args[key] = p[key]
    if "PolicyDocument" in p:
        args["PolicyDocument"] = json.dumps(p["PolicyDocument"])
    endpoint = cloud.client("ec2").create_vpc_endpoint(**args)["VpcEndpoint"]["VpcEndpointId"]
    cloud.endpoint_services.append(p["ServiceName"])
    return _Made(endpoint, {"Id": endpoint, "DnsEntries": [], "NetworkInterfaceIds": []})


# -- compute ---------------------------------------------------------------------------------------------------
@creates("AWS::EC2::LaunchTemplate")
def launch_template(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    data = dict(p["LaunchTemplateData"])
    agent = agent_config_from_user_data(_b64decode(data.get("UserData", "")))
    if "vpcCidr" in agent:
        agent["vpcCidr"] = cloud.addresses.to_twin(agent["vpcCidr"])
    made = cloud.client("ec2").create_launch_template(
        LaunchTemplateName=p.get("LaunchTemplateName", f"twin-{lid}"), LaunchTemplateData=data
    )["LaunchTemplate"]
    version = str(made["LatestVersionNumber"])
    return _Made(
        made["LaunchTemplateId"],
        {
            "LatestVersionNumber": version,
            "DefaultVersionNumber": version,
            "LaunchTemplateId": made["LaunchTemplateId"],
            "agent": agent,
        },
    )


def _b64decode(text: str) -> str:
    import base64

    return base64.b64decode(text).decode() if text else ""


@creates("AWS::AutoScaling::AutoScalingGroup")
def auto_scaling_group(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    name = p.get("AutoScalingGroupName", f"twin-{lid}")
    lt = p.get("LaunchTemplate") or {}
    template_lid = next((k for k, m in cloud.made.items() if m.ref == lt.get("LaunchTemplateId")), None)
    if template_lid is None:
        raise TemplateError(f"{lid}: LaunchTemplate {lt!r}: the twin launches from a LaunchTemplate by id only")
    zones = {m.ref: m.attrs.get("AvailabilityZone") for m in cloud.made.values() if "SubnetId" in m.attrs}
    subnets = [(str(zones[s]), s) for s in p.get("VPCZoneIdentifier", [])]
    tags = p.get("Tags", [])
    role = next((t["Value"] for t in tags if t["Key"] == ROLE_TAG_KEY), "")
    hooks = [_hook(h, "specification") for h in p.get("LifecycleHookSpecificationList", [])]
    policy = (p.get("InstanceLifecyclePolicy") or {}).get("RetentionTriggers", {})
    spec = GroupSpec(
        lid,
        name,
        role,
        int(p["MinSize"]),
        int(p["MaxSize"]),
        int(p.get("DesiredCapacity", p["MinSize"])),
        subnets,
        lt["LaunchTemplateId"],
        dict(cloud.made[template_lid].attrs["agent"]),
        hooks,
        policy.get("TerminateHookAbandon") == "retain",
        [k for k, m in cloud.made.items() if m.ref in p.get("TargetGroupARNs", [])],
        tags,
    )
    # Deviation (moto): moto would launch DesiredCapacity instances itself, without lifecycle hooks. The group is
    # created with MinSize/DesiredCapacity 0 in moto; the twin's lifecycle machine holds the template's sizes
    # (spec.min_size/desired) and attaches each instance it launches.
    cloud.client("autoscaling").create_auto_scaling_group(
        AutoScalingGroupName=name,
        MinSize=0,
        MaxSize=spec.max_size,
        DesiredCapacity=0,
        LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplateId"], "Version": str(lt.get("Version", "$Latest"))},
        VPCZoneIdentifier=",".join(s for _, s in subnets),
        Tags=[
            {"Key": t["Key"], "Value": t["Value"], "PropagateAtLaunch": bool(t.get("PropagateAtLaunch"))} for t in tags
        ],
    )
    # The hooks of the specification list, so DescribeLifecycleHooks answers as AWS does (the reconciler reads it;
    # moto's create_auto_scaling_group does not keep LifecycleHookSpecificationList).
    for hook in hooks:
        _put_hook(cloud, name, hook)
    cloud.groups[name] = spec
    cloud.receiver.group_created(spec)
    return _Made(name)


def _hook(h: dict[str, Any], form: str) -> HookSpec:
    return HookSpec(
        h["LifecycleHookName"],
        h["LifecycleTransition"],
        int(h.get("HeartbeatTimeout", 3600)),
        h.get("DefaultResult", "ABANDON"),
        form,
    )


def _put_hook(cloud: TemplateCloud, group: str, hook: HookSpec) -> None:
    cloud.client("autoscaling").put_lifecycle_hook(
        AutoScalingGroupName=group,
        LifecycleHookName=hook.name,
        LifecycleTransition=hook.transition,
        HeartbeatTimeout=hook.heartbeat_timeout,
        DefaultResult=hook.default_result,
    )


@creates("AWS::AutoScaling::LifecycleHook")
def lifecycle_hook(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    hook = _hook({"LifecycleHookName": p.get("LifecycleHookName", f"twin-{lid}"), **p}, "resource")
    group = p["AutoScalingGroupName"]
    _put_hook(cloud, group, hook)
    cloud.separate_hooks.append((group, hook))
    cloud.receiver.hook_created(group, hook)
    return _Made(hook.name)


# -- load balancer -----------------------------------------------------------------------------------------------
@creates("AWS::ElasticLoadBalancingV2::LoadBalancer")
def load_balancer(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    lb = cloud.client("elbv2").create_load_balancer(
        Name=p["Name"],
        Subnets=p["Subnets"],
        SecurityGroups=p.get("SecurityGroups", []),
        Scheme=p.get("Scheme", "internet-facing"),
        Type=p.get("Type", "network"),
        Tags=_tags(p),
    )["LoadBalancers"][0]
    return _Made(
        lb["LoadBalancerArn"],
        {
            "DNSName": lb["DNSName"],
            "LoadBalancerName": p["Name"],
            "LoadBalancerFullName": lb["LoadBalancerArn"].split("/", 1)[1],
            "CanonicalHostedZoneID": "Z2IFOLAFXWLO4F",
            "LoadBalancerArn": lb["LoadBalancerArn"],
        },
    )


@creates("AWS::ElasticLoadBalancingV2::TargetGroup")
def target_group(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    elbv2 = cloud.client("elbv2")
    tg = elbv2.create_target_group(
        Name=p.get("Name", f"twin-{lid}"[:32]),
        Protocol=p["Protocol"],
        Port=int(p["Port"]),
        VpcId=p["VpcId"],
        TargetType=p.get("TargetType", "instance"),
        HealthCheckProtocol=p.get("HealthCheckProtocol", "TCP"),
        HealthCheckIntervalSeconds=int(p.get("HealthCheckIntervalSeconds", 30)),
        HealthyThresholdCount=int(p.get("HealthyThresholdCount", 5)),
        UnhealthyThresholdCount=int(p.get("UnhealthyThresholdCount", 2)),
    )["TargetGroups"][0]
    attributes = {a["Key"]: str(a["Value"]) for a in p.get("TargetGroupAttributes", [])}
    # Defaults from "Edit target group attributes for your Network Load Balancer": deregistration delay 300 s;
    # client IP preservation on for instance targets (TCP).
    instance_targets = p.get("TargetType", "instance") == "instance"
    spec = TargetGroupSpec(
        lid,
        tg["TargetGroupArn"],
        int(p["Port"]),
        int(p.get("HealthCheckIntervalSeconds", 30)),
        int(p.get("HealthyThresholdCount", 5)),
        int(p.get("UnhealthyThresholdCount", 2)),
        int(attributes.get("deregistration_delay.timeout_seconds", 300)),
        attributes.get("preserve_client_ip.enabled", "true" if instance_targets else "false") == "true",
    )
    cloud.target_groups[lid] = spec
    return _Made(
        tg["TargetGroupArn"],
        {
            "TargetGroupArn": tg["TargetGroupArn"],
            "TargetGroupName": tg["TargetGroupName"],
            "TargetGroupFullName": tg["TargetGroupArn"].split(":", 5)[5],
        },
    )


@creates("AWS::ElasticLoadBalancingV2::Listener")
def listener(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    arn = cloud.client("elbv2").create_listener(
        LoadBalancerArn=p["LoadBalancerArn"],
        Protocol=p["Protocol"],
        Port=int(p["Port"]),
        DefaultActions=p["DefaultActions"],
    )["Listeners"][0]["ListenerArn"]
    return _Made(arn, {"ListenerArn": arn})


# -- state: keys, tables, buckets, secrets, queues, topics, logs --------------------------------------------------
@creates("AWS::KMS::Key")
def kms_key(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    kms = cloud.client("kms")
    meta = kms.create_key(
        Description=p.get("Description", ""),
        Policy=json.dumps(p["KeyPolicy"]),
        Tags=[{"TagKey": t["Key"], "TagValue": t["Value"]} for t in _tags(p)],
    )["KeyMetadata"]
    if p.get("EnableKeyRotation"):
        kms.enable_key_rotation(KeyId=meta["KeyId"])
    return _Made(meta["KeyId"], {"Arn": meta["Arn"], "KeyId": meta["KeyId"]})


@creates("AWS::KMS::Alias")
def kms_alias(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    cloud.client("kms").create_alias(AliasName=p["AliasName"], TargetKeyId=p["TargetKeyId"])
    return _Made(p["AliasName"])


@creates("AWS::DynamoDB::Table")
def table(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    args: dict[str, Any] = {
        k: p[k] for k in ("TableName", "KeySchema", "AttributeDefinitions", "BillingMode") if k in p
    }
    args["TableName"] = args.get("TableName", f"twin-{lid}")
    sse = p.get("SSESpecification")
    if sse:  # CloudFormation's SSEEnabled is the API's Enabled
        args["SSESpecification"] = {
            "Enabled": bool(sse.get("SSEEnabled")),
            "SSEType": sse.get("SSEType", "KMS"),
            **({"KMSMasterKeyId": sse["KMSMasterKeyId"]} if "KMSMasterKeyId" in sse else {}),
        }
    if "DeletionProtectionEnabled" in p:
        args["DeletionProtectionEnabled"] = bool(p["DeletionProtectionEnabled"])
    desc = cloud.client("dynamodb").create_table(**args, Tags=_tags(p))["TableDescription"]
    return _Made(args["TableName"], {"Arn": desc["TableArn"], "StreamArn": desc.get("LatestStreamArn", "")})


@creates("AWS::S3::Bucket")
def bucket(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    name = p.get("BucketName") or f"twin-{lid.lower()}-{secrets.token_hex(4)}"[:63]
    s3 = cloud.client("s3")
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    if "VersioningConfiguration" in p:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration=p["VersioningConfiguration"])
    if "BucketEncryption" in p:
        # CloudFormation's ServerSideEncryptionByDefault is the API's ApplyServerSideEncryptionByDefault.
        rules = [
            {
                ("ApplyServerSideEncryptionByDefault" if k == "ServerSideEncryptionByDefault" else k): v
                for k, v in r.items()
            }
            for r in p["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        ]
        s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
    if "PublicAccessBlockConfiguration" in p:
        s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration=p["PublicAccessBlockConfiguration"])
    if p.get("Tags"):
        s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": _tags(p)})
    arn = f"arn:{PARTITION}:s3:::{name}"
    return _Made(
        name,
        {
            "Arn": arn,
            "DomainName": f"{name}.s3.amazonaws.com",
            "RegionalDomainName": f"{name}.s3.{REGION}.amazonaws.com",
        },
    )


INSECURE_TRANSPORT = {"Bool": {"aws:SecureTransport": "false"}}


@creates("AWS::S3::BucketPolicy")
def bucket_policy(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    """The bucket policy as the template gives it, except its "deny insecure transport" statement.

    moto evaluates bucket policies, and the twin's clients reach it over plain HTTP, where ``aws:SecureTransport``
    is false: that statement would deny every call. In the deployed stack every client talks HTTPS to S3 (boto3's
    default, through the S3 gateway endpoint), so AWS evaluates it as true and the statement never applies ("IAM
    JSON policy elements: Condition", aws:SecureTransport). Leaving it out is exactly as kind as AWS to an HTTPS
    client; ``tests/stacks`` assert the statement is in the template."""
    p = cloud.resolve(props)
    document = dict(p["PolicyDocument"])
    document["Statement"] = [
        s for s in document["Statement"] if not (s.get("Effect") == "Deny" and s.get("Condition") == INSECURE_TRANSPORT)
    ]
    cloud.client("s3").put_bucket_policy(Bucket=p["Bucket"], Policy=json.dumps(document))
    return _Made(p["Bucket"])


@creates("AWS::SecretsManager::Secret")
def secret(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    """As CloudFormation creates it: SecretString as given, GenerateSecretString generated, and with neither an
    EMPTY secret (no version: GetSecretValue fails until something puts a value), per the
    AWS::SecretsManager::Secret reference ("If you omit both GenerateSecretString and SecretString, you create
    an empty secret")."""
    p = cloud.resolve(props)
    args: dict[str, Any] = {"Name": p.get("Name", f"twin-{lid}"), "Description": p.get("Description", "")}
    if "KmsKeyId" in p:
        args["KmsKeyId"] = p["KmsKeyId"]
    if "SecretString" in p:
        args["SecretString"] = p["SecretString"]
    elif "GenerateSecretString" in p:
        args["SecretString"] = _generated(p["GenerateSecretString"])
    arn = cloud.client("secretsmanager").create_secret(**args, Tags=_tags(p))["ARN"]
    return _Made(arn, {"Id": arn})


def _generated(spec: dict[str, Any]) -> str:
    excluded = set(spec.get("ExcludeCharacters", ""))
    alphabet = [c for c in string.ascii_letters + string.digits + string.punctuation if c not in excluded]
    password = "".join(secrets.choice(alphabet) for _ in range(int(spec.get("PasswordLength", 32))))
    if "SecretStringTemplate" in spec:
        return json.dumps({**json.loads(spec["SecretStringTemplate"]), spec["GenerateStringKey"]: password})
    return password


@creates("AWS::SQS::Queue")
def queue(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    name = p.get("QueueName", f"twin-{lid}")
    attributes: dict[str, str] = {}
    if "VisibilityTimeout" in p:  # a timeout the twin runs on: scaled (whole seconds, rounded up)
        attributes["VisibilityTimeout"] = str(cloud.whole_seconds(int(p["VisibilityTimeout"])))
    for key in ("KmsMasterKeyId", "MessageRetentionPeriod", "KmsDataKeyReusePeriodSeconds", "DelaySeconds"):
        if key in p:  # retention is not scaled: nothing in the twin waits on it, and SQS's floor is 60 s
            attributes[key] = str(p[key])
    if "RedrivePolicy" in p:
        attributes["RedrivePolicy"] = json.dumps(p["RedrivePolicy"])
    sqs = cloud.client("sqs")
    moto_url = sqs.create_queue(QueueName=name, Attributes=attributes, tags={t["Key"]: t["Value"] for t in _tags(p)})[
        "QueueUrl"
    ]
    arn = sqs.get_queue_attributes(QueueUrl=moto_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    # Ref is the queue URL as SQS names it (what the agent's config validation expects); boto3 clients pointed at
    # the twin's endpoint send it as a parameter and moto finds the queue by its name.
    url = f"https://sqs.{REGION}.{URL_SUFFIX}/{ACCOUNT}/{name}"
    cloud.queues[lid] = {"url": url, "arn": arn, "attributes": attributes}
    return _Made(url, {"Arn": arn, "QueueName": name, "QueueUrl": url})


@creates("AWS::SQS::QueuePolicy")
def queue_policy(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    for url in p["Queues"]:
        cloud.client("sqs").set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(p["PolicyDocument"])})
    return _Made(f"twin-queue-policy-{lid}")


@creates("AWS::SNS::Topic")
def topic(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    attributes = {"KmsMasterKeyId": p["KmsMasterKeyId"]} if "KmsMasterKeyId" in p else {}
    arn = cloud.client("sns").create_topic(
        Name=p.get("TopicName", f"twin-{lid}"), Attributes=attributes, Tags=_tags(p)
    )["TopicArn"]
    return _Made(arn, {"TopicArn": arn, "TopicName": arn.rsplit(":", 1)[1]})


@creates("AWS::SNS::TopicPolicy")
def topic_policy(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    for arn in p["Topics"]:
        cloud.client("sns").set_topic_attributes(
            TopicArn=arn, AttributeName="Policy", AttributeValue=json.dumps(p["PolicyDocument"])
        )
    return _Made(f"twin-topic-policy-{lid}")


@creates("AWS::Logs::LogGroup")
def log_group(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    name = p.get("LogGroupName", f"/twin/{lid}")
    args: dict[str, Any] = {"logGroupName": name}
    if "KmsKeyId" in p:
        args["kmsKeyId"] = p["KmsKeyId"]
    logs = cloud.client("logs")
    logs.create_log_group(**args)
    if "RetentionInDays" in p:
        logs.put_retention_policy(logGroupName=name, retentionInDays=int(p["RetentionInDays"]))
    return _Made(name, {"Arn": f"arn:{PARTITION}:logs:{REGION}:{ACCOUNT}:log-group:{name}:*"})


# -- Lambda and EventBridge: modelled in-process ------------------------------------------------------------------
@creates("AWS::Lambda::Function")
def function(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    """The handler runs in the twin's process (twin/events.py); what it runs with comes from here."""
    p = cloud.resolve(props)
    name = p.get("FunctionName", f"twin-{lid}")
    module, _, fn = str(p["Handler"]).rpartition(".")
    env = {k: str(v) for k, v in (p.get("Environment") or {}).get("Variables", {}).items()}
    reserved = p.get("ReservedConcurrentExecutions")
    cloud.lambdas[lid] = LambdaSpec(
        lid, name, f"{module}:{fn}", env, int(p.get("Timeout", 3)), int(reserved) if reserved is not None else None
    )
    return _Made(name, {"Arn": f"arn:{PARTITION}:lambda:{REGION}:{ACCOUNT}:function:{name}"})


@creates("AWS::Lambda::EventSourceMapping")
def event_source_mapping(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    function_lid = next(k for k, m in cloud.made.items() if m.ref == p["FunctionName"] and k in cloud.lambdas)
    queue_lid = next((k for k, q in cloud.queues.items() if q["arn"] == p["EventSourceArn"]), None)
    if queue_lid is None:
        raise TemplateError(f"{lid}: EventSourceArn {p['EventSourceArn']!r}: the twin maps SQS queues only")
    scaling = p.get("ScalingConfig") or {}
    cloud.event_sources.append(
        EventSourceSpec(
            function_lid,
            cloud.queues[queue_lid]["url"],
            cloud.queues[queue_lid]["arn"],
            int(p.get("BatchSize", 10)),
            int(p.get("MaximumBatchingWindowInSeconds", 0)),
            int(scaling["MaximumConcurrency"]) if "MaximumConcurrency" in scaling else None,
            tuple(p.get("FunctionResponseTypes", [])),
        )
    )
    return _Made(f"twin-esm-{lid}")


@creates("AWS::Events::Rule")
def rule(cloud: TemplateCloud, lid: str, props: dict[str, Any]) -> _Made:
    p = cloud.resolve(props)
    name = p.get("Name", f"twin-{lid}")
    enabled = p.get("State", "ENABLED") == "ENABLED"
    if enabled:
        cloud.rules.append(
            RuleSpec(
                name, p.get("EventPattern"), p.get("ScheduleExpression"), tuple(t["Arn"] for t in p.get("Targets", []))
            )
        )
    return _Made(name, {"Arn": f"arn:{PARTITION}:events:{REGION}:{ACCOUNT}:rule/{name}"})
