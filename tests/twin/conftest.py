"""The real twin for the twin tests: moto server, real node agents in processes, real etcd.

All twin tests share one xdist group so two twins never compete for the 2 cores at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from twin.cluster import Twin, TwinOptions


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "twin_options(**kwargs): TwinOptions for the real_twin fixture")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/twin/" in str(item.fspath).replace("\\", "/") and "real_twin" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("twin"))
            item.add_marker(pytest.mark.etcd)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def real_twin(request: pytest.FixtureRequest) -> Iterator[Twin]:
    marker = request.node.get_closest_marker("twin_options")
    options = TwinOptions(**(marker.kwargs if marker else {}))
    lines: list[str] = []
    twin = Twin(options, progress=lines.append)
    with twin:
        try:
            yield twin
        finally:
            if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
                print("\n".join(lines[-60:]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
