"""The example notebooks in deploy/notebooks/ work as their README sections say, both as kgpool
serves them and as Kernel Gateway reads them (the `# kgpool:` lines as plain comments)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, Server

pytestmark = pytest.mark.timeout(120)
EXAMPLES = ROOT / "deploy" / "notebooks"
JSON = {"Content-Type": "application/json"}


def without_kgpool_lines(source: Path, target: Path) -> Path:
    """The notebook as Kernel Gateway sees it: kgpool's option lines are mere comments, so
    leaving them out changes nothing there."""
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        cell.source = "\n".join(line for line in cell.source.split("\n")
                                if not line.startswith("# kgpool:"))
    nbformat.write(nb, target)
    return target


@pytest.fixture(scope="module")
def model() -> Iterator[Server]:
    with Server(EXAMPLES / "batched_model.ipynb", "--kernels", "2") as server:
        yield server


def features(seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(-1, 1), 3) for _ in range(16)]


def predict(server: Server, path: str, body: object) -> tuple[int, object]:
    resp = server.request("POST", path, json.dumps(body), headers=JSON)
    assert resp.headers["Content-Type"] == "application/json"
    return resp.status, resp.json()


def close(a: object, b: object) -> bool:
    assert isinstance(a, dict) and isinstance(b, dict)
    return a["label"] == b["label"] and all(
        abs(x - y) < 1e-6 for x, y in zip(a["probabilities"], b["probabilities"], strict=True))


def test_batched_model_gives_every_client_its_own_answer(model: Server) -> None:
    """64 clients at once, each with its own input: each answer is the one the unbatched
    endpoint gives for that input, and requests really were gathered into batches."""
    with ThreadPoolExecutor(64) as pool:
        batched = list(pool.map(lambda i: predict(model, "/predict", {"features": features(i)}),
                                range(64)))
    single = [predict(model, "/predict-one", {"features": features(i)}) for i in range(64)]
    for i, ((status, got), (_, want)) in enumerate(zip(batched, single, strict=True)):
        assert status == 200 and close(got, want), (i, got, want)
    assert len({json.dumps(got) for _, got in batched}) == 64  # distinct inputs, distinct answers
    count = model.metric("kgpool_batch_size_count", 'route="/predict"')
    total = model.metric("kgpool_batch_size_sum", 'route="/predict"')
    assert count < total  # fewer batches than requests: some held more than one


def test_batched_model_refuses_a_bad_input_alone(model: Server) -> None:
    with ThreadPoolExecutor(8) as pool:
        bodies = [{"features": features(i)} for i in range(7)] + [{"features": [1, 2]}]
        answers = list(pool.map(lambda b: predict(model, "/predict", b), bodies))
    assert answers[-1] == (400, {"error": "'features' must be a list of 16 numbers"})
    assert all(status == 200 and "label" in got for status, got in answers[:-1])


def test_batched_model_as_kernel_gateway_reads_it(tmp_path: Path) -> None:
    plain = without_kgpool_lines(EXAMPLES / "batched_model.ipynb", tmp_path / "plain.ipynb")
    with Server(plain, "--kernels", "1") as server, \
            Server(EXAMPLES / "batched_model.ipynb", "--kernels", "1") as batched:
        for seed in range(3):
            status, got = predict(server, "/predict", {"features": features(seed)})
            _, want = predict(batched, "/predict", {"features": features(seed)})
            assert status == 200 and close(got, want)
        assert predict(server, "/predict", {"features": []})[1] == {
            "error": "'features' must be a list of 16 numbers"}


@pytest.fixture(scope="module")
def generator() -> Iterator[Server]:
    with Server(EXAMPLES / "streaming.ipynb", "--kernels", "1") as server:
        yield server


def test_streaming_example_sends_one_event_per_word(generator: Server) -> None:
    resp = generator.get("/generate?prompt=the&words=5")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    events = resp.text.split("\n\n")
    words = [json.loads(e.removeprefix("data: "))["word"] for e in events[:5]]
    assert all(isinstance(w, str) and w for w in words)
    assert events[5:] == ["event: end\ndata: ", ""]
    text = generator.get("/generate-text?prompt=the&words=5")
    assert text.headers["Transfer-Encoding"] == "chunked"
    assert text.text.split() == words  # the same seed, the same words


def test_streaming_example_as_kernel_gateway_reads_it(tmp_path: Path,
                                                      generator: Server) -> None:
    plain = without_kgpool_lines(EXAMPLES / "streaming.ipynb", tmp_path / "plain.ipynb")
    with Server(plain, "--kernels", "1") as server:
        resp = server.get("/generate-text?words=4")
        assert resp.status == 200
        assert resp.text == generator.get("/generate-text?words=4").text  # whole, at the end
