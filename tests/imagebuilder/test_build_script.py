"""scripts/build-k8s-ami-imagebuilder.sh against a recorded-response stub of the AWS CLI.

moto 5.2.5 has no EC2 Image Builder backend, so a fake ``aws`` on PATH answers with the shapes the
real CLI prints for these ``--query ... --output text`` calls and records every call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from stages.config import ClusterConfig
from stages.image_stack import pipeline_name

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-k8s-ami-imagebuilder.sh"
PIPELINE_ARN = "arn:aws:imagebuilder:us-east-1:111111111111:image-pipeline/dk8s-dedicated-k8s-kubernetes-ami"
IMAGE_ARN = "arn:aws:imagebuilder:us-east-1:111111111111:image/dk8s-dedicated-k8s-k8s-1-34-2-abc/1.0.0/1"
AMI = "ami-0123456789abcdef0"
FAILURE = "Component dk8s-images failed: image missing: quay.io/calico/typha:v3.30.3"

FAKE_AWS = """#!{python}
import json, os, sys
state = os.environ["FAKE_AWS_DIR"]
argv = sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as log:
    log.write(json.dumps(argv) + "\\n")
scenario = os.environ.get("FAKE_AWS_SCENARIO", "ok")
def arg(name):
    return argv[argv.index(name) + 1] if name in argv else None
if argv[:2] == ["configure", "get"]:
    sys.exit(1)
if argv[:2] == ["sts", "get-caller-identity"]:
    if scenario == "no-credentials":
        sys.stderr.write("\\nUnable to locate credentials. You can configure credentials by running "
                         "\\"aws configure\\".\\n")
        sys.exit(255)
    if scenario == "dead-region":
        url = "https://sts.%s.amazonaws.com/" % arg("--region")
        sys.stderr.write('\\nCould not connect to the endpoint URL: "%s"\\n' % url)
        sys.exit(255)
    print("111111111111")
    sys.exit(0)
if argv[:2] == ["imagebuilder", "list-image-pipelines"]:
    wanted = "name=name,values=" + os.environ["FAKE_AWS_PIPELINE_NAME"]
    print("{pipeline}" if scenario != "no-pipeline" and arg("--filters") == wanted else "None")
    sys.exit(0)
if argv[:2] == ["imagebuilder", "start-image-pipeline-execution"]:
    print("{image}")
    sys.exit(0)
if argv[:2] == ["imagebuilder", "get-image"]:
    query = arg("--query")
    if query == "image.state.status":
        states = os.environ["FAKE_AWS_STATES"].split(",")
        counter = os.path.join(state, "polls")
        n = int(open(counter).read()) if os.path.exists(counter) else 0
        open(counter, "w").write(str(n + 1))
        print(states[min(n, len(states) - 1)])
    else:
        print({{
            "image.state.reason": "{failure}",
            "image.outputResources.amis[0].image": "{ami}",
            "image.distributionConfiguration.distributions[0].ssmParameterConfigurations[0].parameterName":
                "/dedicated-k8s/ami/kubernetes-1-34",
            "image.infrastructureConfiguration.logging.s3Logs.s3BucketName":
                "dk8s-dedicated-k8s-imagebuilder-logs-111111111111-us-east-1",
            "image.infrastructureConfiguration.logging.s3Logs.s3KeyPrefix": "builds",
            "image.imageRecipe.name": "dk8s-dedicated-k8s-k8s-1-34-2-abc",
        }}.get(query, "None"))
    sys.exit(0)
sys.stderr.write("fake aws: unexpected call %r\\n" % (argv,))
sys.exit(254)
"""


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    calls: list[list[str]]


@pytest.fixture
def fake_aws(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    aws = bin_dir / "aws"
    aws.write_text(
        FAKE_AWS.format(python=sys.executable, pipeline=PIPELINE_ARN, image=IMAGE_ARN, ami=AMI, failure=FAILURE)
    )
    aws.chmod(0o755)
    return bin_dir


def run(tmp_path: Path, bin_dir: Path | None, *args: str, scenario: str = "ok", states: str = "AVAILABLE") -> Run:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    workdir = tmp_path / "cwd"
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        PATH=f"{bin_dir}:/usr/bin:/bin" if bin_dir else "/usr/bin:/bin",
        HOME=str(tmp_path / "home"),
        FAKE_AWS_DIR=str(state),
        FAKE_AWS_SCENARIO=scenario,
        FAKE_AWS_STATES=states,
        FAKE_AWS_PIPELINE_NAME=pipeline_name(ClusterConfig.from_mapping({})),
    )
    result = subprocess.run(
        ["bash", str(SCRIPT), "--poll-seconds", "0", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=60,
        check=False,
    )
    log = state / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert not any(workdir.iterdir()), "the script wrote files into its working directory"
    return Run(result.returncode, result.stdout, result.stderr, calls)


def test_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_script_is_executable_and_lives_in_scripts() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.parent.name == "scripts"


def test_help_explains_usage_without_calling_aws(tmp_path: Path, fake_aws: Path) -> None:
    result = run(tmp_path, fake_aws, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: build-k8s-ami-imagebuilder.sh")
    for option in ("--region", "--cluster-name", "--pipeline-arn", "--timeout-minutes"):
        assert option in result.stdout
    assert result.calls == []


def test_unknown_argument_is_a_usage_error(tmp_path: Path, fake_aws: Path) -> None:
    result = run(tmp_path, fake_aws, "--bogus")
    assert result.returncode == 2
    assert "unknown argument: --bogus" in result.stderr
    assert result.calls == []


def test_refuses_without_the_aws_cli(tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = run(tmp_path, empty)
    assert result.returncode == 2
    assert "the AWS CLI ('aws') is not installed" in result.stderr


def test_refuses_without_credentials_before_touching_image_builder(tmp_path: Path, fake_aws: Path) -> None:
    result = run(tmp_path, fake_aws, "--region", "us-east-1", scenario="no-credentials")
    assert result.returncode == 2
    assert "no usable AWS credentials" in result.stderr
    assert "Unable to locate credentials" in result.stderr
    assert [call[:2] for call in result.calls] == [["sts", "get-caller-identity"]]


def test_refuses_a_malformed_region_without_any_call(tmp_path: Path, fake_aws: Path) -> None:
    result = run(tmp_path, fake_aws, "--region", "useast1")
    assert result.returncode == 2
    assert "'useast1' is not an AWS region name" in result.stderr
    assert result.calls == []


def test_refuses_a_region_that_does_not_answer(tmp_path: Path, fake_aws: Path) -> None:
    result = run(tmp_path, fake_aws, "--region", "us-fake-9", scenario="dead-region")
    assert result.returncode == 2
    assert "region 'us-fake-9' does not answer" in result.stderr


def test_says_to_deploy_the_image_stack_when_the_pipeline_is_missing(tmp_path: Path, fake_aws: Path) -> None:
    result = run(tmp_path, fake_aws, scenario="no-pipeline")
    assert result.returncode == 2
    assert "no image pipeline named 'dk8s-dedicated-k8s-kubernetes-ami' in us-east-1" in result.stderr
    assert "deploy ImageStack first" in result.stderr


def test_builds_shows_progress_and_prints_the_ami_id(tmp_path: Path, fake_aws: Path) -> None:
    states = "PENDING,BUILDING,BUILDING,TESTING,DISTRIBUTING,INTEGRATING,AVAILABLE"
    result = run(tmp_path, fake_aws, states=states)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{AMI}\n"
    progress = [line.split("status ", 1)[1].split()[0] for line in result.stderr.splitlines() if "status " in line]
    assert progress == ["PENDING", "BUILDING", "TESTING", "DISTRIBUTING", "INTEGRATING", "AVAILABLE"]
    assert "SSM parameter /dedicated-k8s/ami/kubernetes-1-34" in result.stderr
    starts = [call for call in result.calls if call[:2] == ["imagebuilder", "start-image-pipeline-execution"]]
    assert len(starts) == 1
    assert starts[0][starts[0].index("--image-pipeline-arn") + 1] == PIPELINE_ARN
    # The region came from cdk.json (no flag, no AWS_REGION, no profile region).
    assert all(call[call.index("--region") + 1] == "us-east-1" for call in result.calls if "--region" in call)


def test_a_failed_build_fails_with_the_reason_and_where_the_logs_are(tmp_path: Path, fake_aws: Path) -> None:
    result = run(tmp_path, fake_aws, "--region", "us-east-1", states="BUILDING,TESTING,FAILED")
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"the image build ended FAILED: {FAILURE}" in result.stderr
    assert "s3://dk8s-dedicated-k8s-imagebuilder-logs-111111111111-us-east-1/builds/" in result.stderr
    assert "/aws/imagebuilder/dk8s-dedicated-k8s-k8s-1-34-2-abc" in result.stderr


def test_an_explicit_pipeline_arn_skips_the_lookup(tmp_path: Path, fake_aws: Path) -> None:
    other = PIPELINE_ARN.replace("dk8s-dedicated-k8s", "dk8s-blue")
    result = run(tmp_path, fake_aws, "--pipeline-arn", other)
    assert result.returncode == 0, result.stderr
    assert not any(call[:2] == ["imagebuilder", "list-image-pipelines"] for call in result.calls)
    (start,) = [call for call in result.calls if call[1] == "start-image-pipeline-execution"]
    assert other in start


@pytest.mark.parametrize("region", ["us-gov-west-1", "cn-north-1"])
def test_builds_in_govcloud_and_china_regions(tmp_path: Path, fake_aws: Path, region: str) -> None:
    result = run(tmp_path, fake_aws, "--region", region, states="BUILDING,AVAILABLE")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{AMI}\n"
    assert all(call[call.index("--region") + 1] == region for call in result.calls if "--region" in call)
