"""The managed hosts-file block that sends the API endpoint name to the node's own API server (node_agent/hosts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.hosts import BEGIN, END, HostsFileError, map_endpoint, mapped_address, resolve, unmap_endpoint

NAME = "dk8s-demo-api-0123456789.elb.eu-west-1.amazonaws.com"
SYSTEM = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n# a comment the operator wrote\n10.0.0.50 build-cache\n"


def test_mapping_adds_one_block_keeps_every_other_line_and_is_idempotent(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(SYSTEM)
    hosts.chmod(0o644)
    assert map_endpoint(hosts, NAME, "10.0.1.7")
    text = hosts.read_text()
    assert text == SYSTEM + f"{BEGIN}\n10.0.1.7 {NAME}\n{END}\n"
    assert not map_endpoint(hosts, NAME, "10.0.1.7")  # nothing to change
    assert hosts.read_text() == text
    assert hosts.stat().st_mode & 0o777 == 0o644
    assert resolve(hosts, NAME) == "10.0.1.7" and resolve(hosts, NAME.upper()) == "10.0.1.7"
    assert resolve(hosts, "build-cache") == "10.0.0.50"
    assert mapped_address(hosts) == "10.0.1.7"


def test_a_new_address_replaces_the_block_and_unmapping_restores_the_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(SYSTEM.rstrip("\n"))  # no final newline: the block still starts on its own line
    map_endpoint(hosts, NAME, "10.0.1.7")
    map_endpoint(hosts, NAME, "10.0.2.8")
    assert hosts.read_text().count(BEGIN) == 1
    assert resolve(hosts, NAME) == "10.0.2.8"
    assert unmap_endpoint(hosts)
    assert hosts.read_text() == SYSTEM
    assert resolve(hosts, NAME) is None and mapped_address(hosts) is None
    assert not unmap_endpoint(hosts)


def test_a_missing_hosts_file_is_created_with_the_block(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    assert map_endpoint(hosts, NAME, "10.0.1.7")
    assert hosts.read_text() == f"{BEGIN}\n10.0.1.7 {NAME}\n{END}\n"


def test_resolution_takes_the_first_matching_line_as_the_files_backend_does(tmp_path: Path) -> None:
    """glibc's files backend (nss_files) answers with the first line that lists the name: an operator's own line
    above the block wins, which is why the agent's line is not the only thing a test trusts."""
    hosts = tmp_path / "hosts"
    hosts.write_text(f"10.9.9.9 {NAME}\n")
    map_endpoint(hosts, NAME, "10.0.1.7")
    assert resolve(hosts, NAME) == "10.9.9.9"


@pytest.mark.parametrize(
    ("name", "ip", "message"),
    [("bad name!", "10.0.1.7", "endpoint name 'bad name!'"), (NAME, "10.0.1.300", "address '10.0.1.300'")],
)
def test_bad_input_is_refused_by_name_and_nothing_is_written(tmp_path: Path, name: str, ip: str, message: str) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(SYSTEM)
    with pytest.raises(HostsFileError, match=message.replace(".", r"\.")):
        map_endpoint(hosts, name, ip)
    assert hosts.read_text() == SYSTEM


def test_damaged_markers_are_refused_and_left_for_an_operator(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    damaged = SYSTEM + f"{BEGIN}\n10.0.1.7 {NAME}\n"  # an END lost by a hand edit
    hosts.write_text(damaged)
    with pytest.raises(HostsFileError, match="markers are damaged"):
        map_endpoint(hosts, NAME, "10.0.1.8")
    with pytest.raises(HostsFileError, match="nothing was changed"):
        unmap_endpoint(hosts)
    assert hosts.read_text() == damaged
    assert [p.name for p in tmp_path.iterdir()] == ["hosts"]  # no temporary file left behind
