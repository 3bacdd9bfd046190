#!/usr/bin/env bash
# Build the air-gapped Kubernetes AMI with EC2 Image Builder (seed step 1):
#
#   cd scripts/ && ./build-k8s-ami-imagebuilder.sh [--region REGION] [--cluster-name NAME]
#
# Starts the image pipeline that ImageStack deployed, shows its progress, and prints the AMI ID on
# stdout (progress goes to stderr). Image Builder writes the AMI ID to the SSM parameter the cluster
# reads. Writes no files. Exit codes: 0 AMI available, 1 build failed/cancelled/timed out,
# 2 usage, credentials, region or pipeline problem.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname -- "$SCRIPT_DIR")
REGION_PATTERN='^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-[0-9]$'

usage() {
  cat <<'EOF'
Usage: build-k8s-ami-imagebuilder.sh [options]

Start the dedicated-k8s image pipeline (deployed by ImageStack), follow the build and print the AMI ID.

Options:
  --region REGION         AWS region (default: --region, $AWS_REGION, $AWS_DEFAULT_REGION,
                          the AWS CLI profile's region, then cdk.json's "region")
  --cluster-name NAME     cluster whose pipeline to run (default: cdk.json's "clusterName")
  --pipeline-arn ARN      run this image pipeline instead of looking it up by name
  --poll-seconds N        seconds between status checks (default: 30)
  --timeout-minutes N     give up after N minutes (default: 180)
  -h, --help              show this help and exit

The AMI ID is printed on stdout; progress and errors go to stderr. Image Builder also writes the
AMI ID to the SSM parameter the cluster reads (/dedicated-k8s/ami/kubernetes-<major>-<minor>).
Requires AWS credentials (checked with `aws sts get-caller-identity`).
EOF
}

say() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
  local code=$1
  shift
  printf 'error: %s\n' "$*" >&2
  exit "$code"
}

# A key from cdk.json's context, or empty (python3 is on every supported workstation and CI image).
context_value() {
  [ -f "$REPO_ROOT/cdk.json" ] || return 0
  python3 - "$REPO_ROOT/cdk.json" "$1" <<'PY' 2>/dev/null || true
import json, sys
value = json.load(open(sys.argv[1])).get("context", {}).get(sys.argv[2])
print(value if isinstance(value, str) else "")
PY
}

region=""
cluster_name=""
pipeline_arn=""
poll_seconds=30
timeout_minutes=180
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --region) [ $# -ge 2 ] || die 2 "--region needs a value"; region=$2; shift 2 ;;
    --cluster-name) [ $# -ge 2 ] || die 2 "--cluster-name needs a value"; cluster_name=$2; shift 2 ;;
    --pipeline-arn) [ $# -ge 2 ] || die 2 "--pipeline-arn needs a value"; pipeline_arn=$2; shift 2 ;;
    --poll-seconds) [ $# -ge 2 ] || die 2 "--poll-seconds needs a value"; poll_seconds=$2; shift 2 ;;
    --timeout-minutes) [ $# -ge 2 ] || die 2 "--timeout-minutes needs a value"; timeout_minutes=$2; shift 2 ;;
    *) usage >&2; die 2 "unknown argument: $1" ;;
  esac
done
[[ $poll_seconds =~ ^[0-9]+$ ]] || die 2 "--poll-seconds must be a whole number, got '$poll_seconds'"
[[ $timeout_minutes =~ ^[1-9][0-9]*$ ]] || die 2 "--timeout-minutes must be a positive whole number, got '$timeout_minutes'"

command -v aws >/dev/null 2>&1 || die 2 "the AWS CLI ('aws') is not installed or not on PATH"

if [ -z "$region" ]; then region=${AWS_REGION:-${AWS_DEFAULT_REGION:-}}; fi
if [ -z "$region" ]; then region=$(aws configure get region 2>/dev/null || true); fi
if [ -z "$region" ]; then region=$(context_value region); fi
[ -n "$region" ] || die 2 "no AWS region: pass --region, set AWS_REGION, or set \"region\" in cdk.json"
[[ $region =~ $REGION_PATTERN ]] || die 2 "'$region' is not an AWS region name (expected something like us-east-1)"

# Credentials first: every later call needs them, and the answer also proves the region has endpoints.
if ! identity_err=$(aws sts get-caller-identity --region "$region" --output text --query Account 2>&1 >/dev/null); then
  case "$identity_err" in
    *"Could not connect to the endpoint URL"* | *"Invalid endpoint"* | *"not a valid region"*)
      die 2 "region '$region' does not answer ($identity_err); check --region / AWS_REGION" ;;
    *)
      die 2 "no usable AWS credentials (aws sts get-caller-identity failed: ${identity_err:-no output}); configure a profile, SSO login or environment credentials" ;;
  esac
fi
account=$(aws sts get-caller-identity --region "$region" --output text --query Account)
say "account $account, region $region"

if [ -z "$pipeline_arn" ]; then
  [ -n "$cluster_name" ] || cluster_name=$(context_value clusterName)
  cluster_name=${cluster_name:-dedicated-k8s}
  pipeline_name="dk8s-${cluster_name}-kubernetes-ami"
  pipeline_arn=$(aws imagebuilder list-image-pipelines --region "$region" \
    --filters "name=name,values=$pipeline_name" --query 'imagePipelineList[0].arn' --output text)
  if [ -z "$pipeline_arn" ] || [ "$pipeline_arn" = None ]; then
    die 2 "no image pipeline named '$pipeline_name' in $region: deploy ImageStack first (npx cdk deploy ImageStack)"
  fi
fi
say "pipeline $pipeline_arn"

client_token="build-$(date -u +%Y%m%dT%H%M%S)-$$"
image_arn=$(aws imagebuilder start-image-pipeline-execution --region "$region" \
  --image-pipeline-arn "$pipeline_arn" --client-token "$client_token" \
  --query imageBuildVersionArn --output text)
if [ -z "$image_arn" ] || [ "$image_arn" = None ]; then die 1 "Image Builder did not start a build"; fi
say "build started: $image_arn"

image_field() {
  aws imagebuilder get-image --region "$region" --image-build-version-arn "$image_arn" --query "$1" --output text
}

where_are_the_logs() {
  local bucket prefix recipe
  bucket=$(image_field 'image.infrastructureConfiguration.logging.s3Logs.s3BucketName' || true)
  prefix=$(image_field 'image.infrastructureConfiguration.logging.s3Logs.s3KeyPrefix' || true)
  recipe=$(image_field 'image.imageRecipe.name' || true)
  printf 'logs:\n' >&2
  if [ -n "$bucket" ] && [ "$bucket" != None ]; then
    printf '  S3:          s3://%s/%s/\n' "$bucket" "${prefix:-}" >&2
  fi
  printf '  CloudWatch:  log group /aws/imagebuilder/%s (region %s)\n' "${recipe:-<recipe>}" "$region" >&2
  printf '  Workflow:    aws imagebuilder list-workflow-executions --region %s --image-build-version-arn %s\n' \
    "$region" "$image_arn" >&2
}

started=$(date +%s)
deadline=$((started + timeout_minutes * 60))
last_status=""
while :; do
  status=$(image_field 'image.state.status') || die 1 "cannot read the state of $image_arn (it keeps running)"
  if [ "$status" != "$last_status" ]; then
    say "status $status (after $(( ($(date +%s) - started) / 60 )) min)"
    last_status=$status
  fi
  case "$status" in
    AVAILABLE)
      ami=$(image_field 'image.outputResources.amis[0].image')
      parameter=$(image_field 'image.distributionConfiguration.distributions[0].ssmParameterConfigurations[0].parameterName' || true)
      [[ $ami =~ ^ami-[0-9a-f]+$ ]] || die 1 "the build finished but reported no AMI (got '$ami')"
      say "AMI $ami is available${parameter:+; its ID is in SSM parameter $parameter}"
      printf '%s\n' "$ami"
      exit 0
      ;;
    FAILED | CANCELLED | DEPRECATED | DELETED)
      reason=$(image_field 'image.state.reason' || true)
      printf 'error: the image build ended %s: %s\n' "$status" "${reason:-no reason given}" >&2
      where_are_the_logs
      exit 1
      ;;
  esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    printf 'error: the build is still %s after %s minutes; it keeps running in Image Builder\n' \
      "$status" "$timeout_minutes" >&2
    where_are_the_logs
    exit 1
  fi
  sleep "$poll_seconds"
done
