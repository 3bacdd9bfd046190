"""Configuration that cannot deploy, or deploys open, is refused at synth; docs/refusals.md is checked row by row.

Every synth row of docs/refusals.md is fed to the real app (``app.build_app`` on a ``cdk.App`` whose context is
``cdk.json``'s plus the row's ``-c`` pairs, as strings, exactly as the CDK CLI passes them) and the problems it
reports must equal the row's messages, all of them and in order. Every command-line row is run through the tool's
own ``main`` (AWS and the chaos run replaced by objects that fail the test if touched) and argparse's last stderr
line must equal the row's message. Every secret row is stored in moto's Secrets Manager as the worker join secret
and read by the agent's SecretStore, whose error must equal the row's message. A section the test does not know
fails it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest

from app import build_app
from pipeline.config import PipelineSettings
from stages.config import CONTEXT_KEYS, PIPELINE_CONTEXT_KEYS, ClusterConfig, ConfigError
from tests.stacks.conftest import ROOT, default_context

REFUSALS = ROOT / "docs" / "refusals.md"
# The sections of docs/refusals.md whose rows are `-c` inputs to `cdk synth` (both go through app.build_app).
SYNTH_SECTIONS = ("Configuration at synth", "Pipeline settings at synth")
# The section whose rows are `python -m <tool> <flags>` command lines.
COMMAND_LINE_SECTION = "Command lines"
# The section whose rows are values of the worker join secret.
SECRET_SECTION = "Node agent secrets"

# What the CDK CLI itself puts in the app's context (CDK_CONTEXT_JSON), seen from `cdk synth` of CDK CLI
# 2.1148.1 with an app that prints its context keys; the names are the CLI switches of aws-cdk's cx-api
# (packages/@aws-cdk/cx-api/lib/cxapi.ts: 'aws:cdk:enable-path-metadata', ...). Also a lookup-cache entry of
# cdk.context.json ("Context values and the AWS CDK": keys like 'availability-zones:account=...:region=...')
# and `cdk acknowledge`'s list: none of them is ours, none may be refused.
CDK_OWN_CONTEXT: dict[str, Any] = {
    "@aws-cdk/core:failSynthOnValidationErrors": True,
    "aws:cdk:bundling-stacks": ["**"],
    "aws:cdk:enable-asset-metadata": True,
    "aws:cdk:enable-path-metadata": True,
    "aws:cdk:version-reporting": True,
    "availability-zones:account=123456789012:region=us-east-1": ["us-east-1a", "us-east-1b", "us-east-1c"],
    "acknowledged-issue-numbers": [32775],
}


def refusal_rows() -> list[tuple[str, str, list[str]]]:
    """(section, input, messages) for every table row of docs/refusals.md."""
    rows: list[tuple[str, str, list[str]]] = []
    section = ""
    for line in REFUSALS.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        match = re.fullmatch(r"\| `(?P<input>[^`]+)` \| (?P<messages>`.*`) \|", line)
        if match:
            messages = [m.removeprefix("`").removesuffix("`") for m in match["messages"].split("<br>")]
            rows.append((section, match["input"], messages))
    return rows


def context_with(cli_args: str) -> dict[str, Any]:
    """cdk.json's context with ``key=value`` pairs (space-separated) on top, values as strings like ``-c``."""
    context = default_context()
    for pair in cli_args.split(" "):
        key, sep, value = pair.partition("=")
        assert sep and key, f"docs/refusals.md: {pair!r} is not key=value"
        context[key] = value
    return context


def app_problems(context: dict[str, Any]) -> list[str]:
    """The problems the app reports for this context (the app refuses before it builds any construct)."""
    with pytest.raises(ConfigError) as caught:
        build_app(cdk.App(context=context))
    return caught.value.problems


def test_the_refusals_table_has_rows_in_every_section_and_only_in_sections_the_test_checks() -> None:
    rows = refusal_rows()
    assert {section for section, _, _ in rows} == {*SYNTH_SECTIONS, COMMAND_LINE_SECTION, SECRET_SECTION}
    assert len(rows) >= 40


@pytest.mark.parametrize(
    ("section", "cli_args", "messages"),
    [row for row in refusal_rows() if row[0] in SYNTH_SECTIONS],
    ids=lambda v: str(v)[:60],
)
def test_each_synth_row_of_the_refusals_table_is_refused_by_the_app_with_exactly_its_messages(
    section: str, cli_args: str, messages: list[str]
) -> None:
    assert app_problems(context_with(cli_args)) == messages


class NoAws:
    """Any AWS client call fails the test: a refused command line starts nothing."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"AWS called ({name}) although the command line was refused")


def tool_main(module: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], Any]:
    """The ``main`` of ``python -m <module>``, unable to reach AWS or start a chaos run."""
    from pipeline.canary.__main__ import main as canary_main
    from pipeline.rollout import main as rollout_main
    from twin import chaos

    def no_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the chaos run started although the command line was refused")

    monkeypatch.setattr(chaos, "run_chaos", no_run)
    tools: dict[str, Callable[[list[str]], Any]] = {
        "pipeline.rollout": lambda argv: rollout_main(argv, autoscaling=NoAws(), lambda_client=NoAws()),
        "pipeline.canary": canary_main,
        "twin.chaos": chaos.main,
    }
    assert module in tools, f"docs/refusals.md: no test runs {module!r}"
    return tools[module]


@pytest.mark.parametrize(
    ("command_line", "messages"),
    [(command, messages) for section, command, messages in refusal_rows() if section == COMMAND_LINE_SECTION],
    ids=lambda v: str(v)[:60],
)
def test_each_command_line_row_of_the_refusals_table_exits_2_with_exactly_its_message(
    command_line: str, messages: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    python, flag, module, *argv = command_line.split(" ")
    assert (python, flag) == ("python", "-m")
    main = tool_main(module, monkeypatch)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1:] == messages


def test_a_misspelt_key_is_refused_by_cdk_synth_itself_naming_the_nearest_key(tmp_path: Path) -> None:
    """The real CDK CLI (node_modules/.bin/cdk) with ``-c controlPlaneCout=5``: the CLI adds its own context keys
    (CDK_OWN_CONTEXT), so this also proves that none of those is refused: the only problem is the misspelling."""
    cli = ROOT / "node_modules" / ".bin" / "cdk"
    if not cli.exists():
        pytest.fail("node_modules/.bin/cdk is missing: run `make setup` (npm ci)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION"] = "20"
    assert shutil.which("node", path=env.get("PATH")) is not None
    result = subprocess.run(
        [str(cli), "synth", "--no-notices", "-o", str(tmp_path / "out"), "-c", "controlPlaneCout=5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode != 0
    problems = [line[4:] for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert problems == ["'controlPlaneCout' = \"5\": is not a known key; did you mean 'controlPlaneCount'?"]
    assert not list((tmp_path / "out").glob("*.template.json"))


def test_cdk_json_and_the_keys_cdk_itself_adds_are_accepted() -> None:
    context = {**default_context(), **CDK_OWN_CONTEXT}
    config = ClusterConfig.from_context(context.get, given_keys=context)
    assert config.control_plane_count == 3
    PipelineSettings.from_context(context.get)


def test_an_unknown_key_is_reported_together_with_the_other_problems() -> None:
    problems = app_problems({**default_context(), "controlPlaneCout": "5", "tenancy": "shared"})
    assert problems == [
        "'tenancy' = \"shared\": must be one of dedicated, default",
        "'controlPlaneCout' = \"5\": is not a known key; did you mean 'controlPlaneCount'?",
    ]


def recorded_reads(reader: Callable[[Callable[[str], Any]], Any], context: dict[str, Any]) -> set[str]:
    asked: set[str] = set()

    def get(key: str) -> Any:
        asked.add(key)
        return context.get(key)

    reader(get)
    return asked


def test_the_known_keys_are_exactly_the_keys_the_app_reads() -> None:
    """A key the parser reads but CONTEXT_KEYS lacks would be refused as unknown; a stale one would hide a typo."""
    context = default_context()
    assert recorded_reads(ClusterConfig.from_context, context) == set(CONTEXT_KEYS)
    pipeline_reads: set[str] = set()
    for source in ({}, {"pipelineSource": "codecommit", "pipelineCodeCommitRepository": "repo"}):
        pipeline_reads |= recorded_reads(PipelineSettings.from_context, {**context, **source})
    assert pipeline_reads - set(CONTEXT_KEYS) == set(PIPELINE_CONTEXT_KEYS)


def config_with(**overrides: Any) -> ClusterConfig:
    context = {**default_context(), **overrides}
    return ClusterConfig.from_context(context.get, given_keys=context)


def problems_for(**overrides: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_with(**overrides)
    return caught.value.problems


@pytest.mark.parametrize("cidr", ["10.1.0.0/16", "172.31.0.0/16", "192.168.10.0/24", "100.64.0.0/10", "100.127.0.0/16"])
def test_private_api_access_ranges_are_accepted(cidr: str) -> None:
    """RFC 1918's three ranges and RFC 6598's shared address space 100.64.0.0/10 (carrier-grade NAT, VPNs)."""
    assert config_with(apiAccessCidrs=[cidr]).api_access_cidrs == (cidr,)


@pytest.mark.parametrize("cidr", ["172.32.0.0/16", "100.128.0.0/16", "192.0.2.0/24", "198.18.0.0/15", "11.0.0.0/8"])
def test_a_public_api_access_range_is_refused_without_the_opt_in_and_accepted_with_it(cidr: str) -> None:
    """Just outside the private ranges, and ranges Python's ``is_private`` calls private (TEST-NET-1, the
    benchmarking range) but that are no network's own: refused unless ``allowPublicApiAccessCidrs`` says so."""
    [problem] = problems_for(apiAccessCidrs=[cidr])
    assert problem.startswith(f"'apiAccessCidrs' = \"{cidr}\": is not a private range")
    assert "allowPublicApiAccessCidrs=true" in problem
    assert config_with(apiAccessCidrs=[cidr], allowPublicApiAccessCidrs="true").api_access_cidrs == (cidr,)


@pytest.mark.parametrize(
    "cidrs", [["0.0.0.0/0"], ["0.0.0.0/1", "128.0.0.0/1"], ["0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/1", "10.0.0.0/8"]]
)
def test_all_of_ipv4_is_refused_even_with_the_opt_in_in_one_range_or_several(cidrs: list[str]) -> None:
    problems = problems_for(apiAccessCidrs=cidrs, allowPublicApiAccessCidrs=True)
    assert len(problems) == 1 and problems[0].startswith("'apiAccessCidrs' = ")
    assert "0.0.0.0/0" in problems[0]


@pytest.mark.parametrize(
    ("vpc_cidr", "other"),
    [("192.168.0.0/16", "192.168.0.0/16"), ("192.168.128.0/20", "192.168.0.0/16"), ("10.96.0.0/16", "10.96.0.0/12"),
     ("10.111.0.0/16", "10.96.0.0/12"), ("10.0.0.0/8", "10.96.0.0/12")],
)  # fmt: skip
def test_a_vpc_overlapping_the_pod_or_service_cidr_is_refused_naming_both(vpc_cidr: str, other: str) -> None:
    """kubeadm's "Creating a cluster with kubeadm" (kubernetes.io/docs/setup/production-environment/tools/kubeadm/
    create-cluster-kubeadm/): the pod network must not overlap any host network; the service range (kubeadm's
    serviceSubnet, default 10.96.0.0/12) is routed by kube-proxy on every node, so a VPC address inside it would
    be captured too. A new VPC and an imported one are both checked (10.0.0.0/8 is too wide for a new one)."""
    imported = {
        "vpcId": "vpc-0123456789abcdef0",
        "privateSubnetIds": [f"subnet-0123456789abcdef{i}" for i in range(3)],
        "privateRouteTableIds": [f"rtb-0123456789abcdef{i}" for i in range(3)],
    }
    for extra in ({}, imported):
        overlaps = [p for p in problems_for(vpcCidr=vpc_cidr, **extra) if "overlaps" in p]
        assert len(overlaps) == 1
        assert overlaps[0].startswith(f"'vpcCidr' = \"{vpc_cidr}\": overlaps the cluster's ")
        assert f" {other}: " in overlaps[0]


@pytest.mark.parametrize("vpc_cidr", ["10.95.0.0/16", "10.112.0.0/16", "10.80.0.0/16", "172.16.0.0/16"])
def test_a_vpc_next_to_the_pod_and_service_cidrs_is_accepted(vpc_cidr: str) -> None:
    assert config_with(vpcCidr=vpc_cidr).vpc.cidr == vpc_cidr


@pytest.mark.parametrize("zone", ["us-east-1", "us-east-1aa", "us-east-1-bos-1a", "us-east-1A", "us-east-1 a"])
def test_an_availability_zone_that_is_not_the_region_and_one_letter_is_refused_naming_it(zone: str) -> None:
    """ "AWS Availability Zones" (docs.aws.amazon.com/global-infrastructure/latest/regions/aws-availability-zones.html):
    an AZ's code is its Region code followed by a letter identifier. Local Zones ('us-east-1-bos-1a') are not AZs
    and an NLB cannot use them ("Update the Availability Zones for your Network Load Balancer")."""
    zones = ["us-east-1a", "us-east-1b", "us-east-1c", zone]
    [problem] = problems_for(availabilityZones=zones)
    assert problem.startswith(f"'availabilityZones' = {json.dumps(zone)}: must be an availability zone of region")


def test_a_duplicated_availability_zone_is_refused_naming_it() -> None:
    """ELB's CreateLoadBalancer (API reference, Subnets): "You can specify only one subnet per Availability
    Zone"; the stack puts one private subnet per listed zone under the NLB and every interface endpoint."""
    [problem] = problems_for(availabilityZones=["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1b"])
    assert problem.startswith("'availabilityZones' = \"us-east-1b\": is listed 2 times")
    assert config_with(availabilityZones="us-east-1a,us-east-1b,us-east-1c,us-east-1d").availability_zones[3] == (
        "us-east-1d"
    )


def test_preflight_refuses_a_misspelt_context_key_like_the_app() -> None:
    """``python -m pipeline.preflight --context k=v`` reads the configuration the deploy will read: a misspelt key
    that the deploy refuses must not pass the preflight as the default."""
    from pipeline.preflight import load_config, read_context

    assert load_config(read_context([]), None, "us-east-1", None).control_plane_count == 3
    with pytest.raises(ConfigError) as caught:
        load_config(read_context(["controlPlaneCout=5"]), None, "us-east-1", None)
    assert caught.value.problems == [
        "'controlPlaneCout' = \"5\": is not a known key; did you mean 'controlPlaneCount'?"
    ]


@pytest.mark.parametrize(
    ("value", "messages"),
    [(value, messages) for section, value, messages in refusal_rows() if section == SECRET_SECTION],
    ids=lambda v: str(v)[:60],
)
def test_each_secret_row_of_the_refusals_table_is_refused_as_corrupt_with_exactly_its_message(
    value: str, messages: list[str]
) -> None:
    """moto's Secrets Manager returns the stored SecretString as given (GetSecretValue); the agent must call it
    corrupt (not "not written yet", which would make a worker wait out its join deadline)."""
    import boto3
    from moto import mock_aws

    from node_agent.errors import SecretUnreadableError
    from node_agent.secrets import SecretStore

    name = ClusterConfig.from_mapping(default_context()).join_secret_name
    with mock_aws():
        client = boto3.client("secretsmanager", region_name="us-east-1")
        client.create_secret(Name=name, SecretString=value)
        with pytest.raises(SecretUnreadableError) as caught:
            SecretStore(client).read_join(name)
    assert [str(caught.value)] == messages
    assert not caught.value.not_written_yet
