"""ServiceAccountIssuer: IAM Roles for Service Accounts (IRSA) on a self-managed cluster.

A pod gets AWS credentials by exchanging its projected service-account token (audience ``sts.amazonaws.com``)
with ``sts:AssumeRoleWithWebIdentity``. STS trusts the token only if an IAM OIDC provider names the token's
issuer, and it validates the signature by fetching, **anonymously over HTTPS**, the issuer's discovery document
(``<issuer>/.well-known/openid-configuration``) and the JWKS it points to (``<issuer>/keys.json``). EKS serves
those from its own endpoint; a self-managed cluster must publish them somewhere STS can read without
credentials. kOps does exactly this with an S3 bucket; so do we:

* the bucket (SSE-S3, versioned, TLS only, access logs to the cluster's log bucket, ACLs disabled) is private
  except for **exactly two objects**, the discovery document and the JWKS, which its bucket policy lets anyone
  read (``s3:GetObject`` on those two keys, nothing else: no listing, no other key, no older versions, no
  write). Both contain only public material: the issuer URL and the service-account *public* key. SSE-KMS is
  not possible here: an anonymous reader cannot use a KMS key.
* the IAM OIDC provider is the L1 ``AWS::IAM::OIDCProvider`` (no custom-resource Lambda), client ID
  ``sts.amazonaws.com``. It carries **no ThumbprintList**: CloudFormation no longer requires it, and IAM
  validates issuers whose JWKS host has a certificate from a CA it trusts (S3's endpoints do) with its own root
  store, so a pinned thumbprint would only be a value to rotate by hand.
* the control-plane node that runs ``kubeadm init`` writes both documents (``node_agent/irsa.py``), with the
  ``s3:PutObject`` on these two keys that IamStack grants its role.

The issuer URL is the bucket's regional virtual-hosted-style URL (``https://<bucket>.s3.<region>.<url suffix>``,
``amazonaws.com.cn`` in China), so it is known at synth, before anything exists.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from stages.config import IRSA_AUDIENCE, IRSA_DISCOVERY_KEY, IRSA_JWKS_KEY, ClusterConfig
from stages.nag import skip_checkov, suppress

PUBLIC_KEYS = (IRSA_DISCOVERY_KEY, IRSA_JWKS_KEY)
PUBLIC_READ_REASON = (
    "the service-account issuer's OIDC discovery document and JWKS must be readable anonymously: STS fetches them "
    "without credentials to validate pod tokens (IRSA on a self-managed cluster, as kOps does). Only these two "
    "objects (issuer URL and public key) are readable; the rest of the bucket is private"
)


class ServiceAccountIssuer(Construct):
    """The issuer bucket (two public objects) and the IAM OIDC provider that trusts it."""

    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, log_bucket: s3.IBucket) -> None:
        super().__init__(scope, construct_id)
        stack = cdk.Stack.of(self)
        self.issuer_url = config.irsa_issuer_url(cdk.Aws.ACCOUNT_ID, cdk.Aws.REGION, stack.url_suffix)

        self.bucket = s3.Bucket(
            self,
            "Bucket",
            bucket_name=config.irsa_issuer_bucket_name(cdk.Aws.ACCOUNT_ID, cdk.Aws.REGION),
            encryption=s3.BucketEncryption.S3_MANAGED,
            # ACLs stay blocked and disabled; only a bucket policy may grant public read (the one below does).
            block_public_access=s3.BlockPublicAccess(
                block_public_acls=True,
                ignore_public_acls=True,
                block_public_policy=False,
                restrict_public_buckets=False,
            ),
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            enforce_ssl=True,
            versioned=True,
            server_access_logs_bucket=log_bucket,
            server_access_logs_prefix="irsa-issuer-bucket/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="old-documents",
                    noncurrent_version_expiration=cdk.Duration.days(30),
                    abort_incomplete_multipart_upload_after=cdk.Duration.days(1),
                )
            ],
            # Not retained when the create that made it rolls back (the fixed name would block the retry).
            removal_policy=cdk.RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE,
        )
        self.bucket.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AnonymousReadOfTheIssuerDocumentsOnly",
                principals=[iam.AnyPrincipal()],
                actions=["s3:GetObject"],
                resources=[self.bucket.arn_for_objects(key) for key in PUBLIC_KEYS],
            )
        )
        bucket_resource = self.bucket.node.default_child
        assert isinstance(bucket_resource, cdk.CfnResource)
        suppress(self.bucket, "AwsSolutions-S2", PUBLIC_READ_REASON, children=False)
        skip_checkov(
            bucket_resource,
            [
                ("CKV_AWS_54", PUBLIC_READ_REASON),
                ("CKV_AWS_56", PUBLIC_READ_REASON),
                ("CKV_AWS_145", "objects read anonymously by STS cannot be SSE-KMS encrypted; SSE-S3 is used"),
            ],
        )
        assert self.bucket.policy is not None
        policy_resource = self.bucket.policy.node.default_child
        assert isinstance(policy_resource, cdk.CfnResource)
        skip_checkov(policy_resource, [("CKV_AWS_70", PUBLIC_READ_REASON)])

        self.provider = iam.CfnOIDCProvider(
            self,
            "Provider",
            url=self.issuer_url,
            client_id_list=[IRSA_AUDIENCE],
            # No thumbprint_list: optional in CloudFormation; IAM trusts S3's certificate through its own CA store.
        )
        # IAM reaches the issuer's host when it creates the provider: the bucket exists first.
        self.provider.node.add_dependency(self.bucket)

        self.outputs = {"IrsaIssuerUrl": self.issuer_url, "IrsaOidcProviderArn": self.provider.attr_arn}


def issuer_writer_statements(stack: cdk.Stack, config: ClusterConfig) -> list[iam.PolicyStatement]:
    """IamStack's grant to the control-plane role: write the two issuer documents, and nothing else in the bucket
    (none when IRSA is off). By name, before the bucket exists, like every other IamStack grant."""
    if not config.irsa:
        return []
    name = config.irsa_issuer_bucket_name(cdk.Aws.ACCOUNT_ID, cdk.Aws.REGION)
    bucket_arn = stack.format_arn(service="s3", region="", account="", resource=name)
    return [
        iam.PolicyStatement(
            sid="IrsaIssuerDocuments",
            actions=["s3:PutObject"],
            resources=[f"{bucket_arn}/{key}" for key in PUBLIC_KEYS],
        )
    ]
