"""NotebookService in process, with real kernels: requests, versions and rolling reloads."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import nbformat
import pytest
from prometheus_client import CollectorRegistry

from kgpool.config import Settings
from kgpool.errors import EndpointRemoved, ExecutionError, InitError, ResponseTooLarge
from kgpool.metrics import Metrics
from kgpool.notebook import Notebook, parse_notebook
from kgpool.requests import RequestData
from kgpool.service import NotebookService

pytestmark = pytest.mark.timeout(90)
CHANNEL = os.environ.get("KGPOOL_CHANNEL", "direct")
FORK = os.environ.get("KGPOOL_FORK", "") not in ("", "0")  # tests/run.sh's fork pass


def nb(*cells: str) -> Notebook:
    book = nbformat.v4.new_notebook()
    book.metadata = {"kernelspec": {"name": "python3", "display_name": "P",
                                    "language": "python"}, "language_info": {"name": "python"}}
    book.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return parse_notebook(nbformat.writes(book), name="svc")


V1 = nb("import json, os\nVERSION = 1", "# GET /v\nprint(VERSION, os.getpid(), end='')",
        "# GET /env\nprint(os.environ.get('KERNEL_GATEWAY'), end='')",
        "# POST /kind\nprint(type(json.loads(REQUEST)['body']).__name__, end='')",
        "# GET /big\nprint('x' * 5000, end='')", "# GET /old-only\nprint('old', end='')")
V2 = nb("import json, os\nVERSION = 2", "# GET /v\nprint(VERSION, os.getpid(), end='')")


@pytest.fixture
async def service() -> AsyncIterator[NotebookService]:
    settings = Settings(notebooks=("svc.ipynb",), kernels=2, channel=CHANNEL, fork=FORK,
                        max_response_size=1000)
    svc = NotebookService(V1, settings, Metrics(CollectorRegistry()).for_notebook("svc"))
    svc.begin()
    try:
        await svc.warmed()
        yield svc
    finally:
        await svc.close()


def endpoint(svc: NotebookService, method: str, path: str):  # type: ignore[no-untyped-def]
    return svc.current.endpoints[(method, path)][1]


async def test_requests_run_with_kernel_gateways_environment(service: NotebookService) -> None:
    reply = await service.call(endpoint(service, "GET", "/env"), RequestData())
    assert (reply.status, reply.body) == (200, b"1")


async def test_a_body_too_deep_for_json_is_text_and_costs_no_kernel(
        service: NotebookService) -> None:
    deep = RequestData(body=b"[" * 50_000 + b"]" * 50_000, content_type="application/json")
    reply = await service.call(endpoint(service, "POST", "/kind"), deep)
    assert reply.body == b"str"
    status = service.status()
    assert (status.idle, status.busy) == (2, 0)


async def test_an_answer_past_the_limit_keeps_the_kernel(service: NotebookService) -> None:
    pids = {lease.kernel.pid for lease in service.pool.members()}
    with pytest.raises(ResponseTooLarge):
        await service.call(endpoint(service, "GET", "/big"), RequestData())
    assert {lease.kernel.pid for lease in service.pool.members()} == pids


async def test_reload_rolls_every_kernel_to_the_new_version(service: NotebookService) -> None:
    old = {lease.kernel.pid for lease in service.pool.members()}
    removed = endpoint(service, "GET", "/old-only")
    await service.reload(V2)
    assert service.current.notebook is V2
    assert {lease.version for lease in service.pool.members()} == {service.current.number}
    assert not old & {lease.kernel.pid for lease in service.pool.members()}
    reply = await service.call(endpoint(service, "GET", "/v"), RequestData())
    assert reply.body.startswith(b"2 ")
    assert list(service._versions) == [service.current.number]  # the old version is gone
    with pytest.raises(EndpointRemoved):  # matched before the reload, called after it
        await service.call(removed, RequestData())


async def test_a_version_that_cannot_warm_is_refused(service: NotebookService) -> None:
    before = service.current
    with pytest.raises(InitError, match="ZeroDivisionError"):
        await service.reload(nb("x = 1 / 0", "# GET /v\nprint('never')"))
    assert service.current is before and service.status().idle == 2
    reply = await service.call(endpoint(service, "GET", "/v"), RequestData())
    assert reply.body.startswith(b"1 ")


async def test_cell_errors_are_execution_errors(service: NotebookService) -> None:
    bad = nb("import json", "# GET /boom\nraise ValueError('no')")
    await service.reload(bad)
    with pytest.raises(ExecutionError) as info:
        await service.call(endpoint(service, "GET", "/boom"), RequestData())
    assert (info.value.ename, info.value.evalue) == ("ValueError", "no")


async def test_close_without_begin_and_runtime_folder_removed(tmp_path: Path) -> None:
    settings = Settings(notebooks=("svc.ipynb",), channel=CHANNEL, fork=FORK)
    idle = NotebookService(V1, settings, Metrics(CollectorRegistry()).for_notebook("svc"))
    await idle.close()  # nothing was allocated: nothing to free, no error
    svc = NotebookService(V1, settings, Metrics(CollectorRegistry()).for_notebook("svc"))
    svc.begin()
    await svc.warmed()
    folder = svc._ipc_dir
    assert folder is not None and os.path.isdir(folder)
    assert any(name.endswith(".json") for name in os.listdir(folder))  # connection files here
    await svc.close()
    assert not os.path.exists(folder)


def test_request_documents_are_plain_data() -> None:
    from kgpool.requests import request_document
    doc = json.loads(request_document(RequestData(query=(("a", "1"),), params={"p": "x"})))
    assert doc == {"body": "", "args": {"a": ["1"]}, "path": {"p": "x"}, "headers": {}}
