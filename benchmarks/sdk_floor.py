"""The `openai` SDK's own CPU per request, and the runner's client on top of it: the floor under figure 1.

Against a zero-latency simulator in its own process, with one small image (~48 KB JPEG, prepared once, so image
reading is not counted), this process sends N requests at concurrency C through each path and reports its own
CPU per request (``time.process_time``: every thread of this process, nothing of the simulator's):

* ``sdk create``: ``AsyncOpenAI.chat.completions.create(messages=...)`` as the SDK's README shows it: its param
  transforms over the messages, JSON encoding, typed ``ChatCompletion`` models;
* ``sdk post``: the same client's ``post("/chat/completions", content=<bytes>, cast_to=httpx.Response)`` with the
  body serialised once by ``request_body.json_body`` and the answer decoded once by ``json.loads``: the SDK's
  floor (its request building, headers, status errors and the HTTP stack remain);
* ``ChatClient full`` / ``ChatClient cheap``: the runner's client (``client.ChatClient.complete``: the size-bounded
  transport, the answer's checks, a ``Completion``) through the SDK's typed path or the raw one (the default).

Each for both transports (httpx and the SDK's aiohttp one). Paths run interleaved, ``--rounds`` times, and the
median is printed, because other jobs on a shared machine move any one measurement.

    python benchmarks/sdk_floor.py                 # 2,000 requests per path and round, C = 32, 3 rounds
    python benchmarks/sdk_floor.py --requests 500 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import openai
from _common import simulator_process, synthetic_images
from _fixtures import MAX_TOKENS, MODEL, PROMPT, job_dict

from qwenvl_batch import job_from_dict
from qwenvl_batch.client import ChatClient, httpx
from qwenvl_batch.media import parse_image_cell, prepare_image
from qwenvl_batch.request_body import json_body

Send = Callable[[list[dict[str, Any]]], Awaitable[Any]]


def messages_for(image_dir: Path) -> list[dict[str, Any]]:
    """One request's messages: a prepared ~48 KB JPEG and the benchmark prompt."""
    ref = parse_image_cell("img/img0000.jpg", column="image", base_dir=image_dir)[0]
    image = prepare_image(ref)
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image.url}},
                                         {"type": "text", "text": PROMPT}]}]


async def measure(send: Send, messages: list[dict[str, Any]], requests: int, concurrency: int) -> tuple[float, float]:
    """(requests/s, CPU ms per request) of ``requests`` sends, ``concurrency`` at a time."""
    remaining = iter(range(requests))

    async def lane() -> None:
        for _ in remaining:
            await send(messages)

    for _ in range(min(concurrency, 50)):  # warm the connection pool and the SDK's first-request work
        await send(messages)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return requests / wall, 1000 * cpu / requests


def sdk_paths(url: str, transport: str, concurrency: int) -> dict[str, tuple[Send, Any]]:
    """The plain SDK's two ways to send (no runner code but the body encoder), on one transport."""
    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=url, max_retries=0,
                                http_client=_raw_http_client(transport, concurrency + 8))

    async def create(messages: list[dict[str, Any]]) -> Any:
        completion = await client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                          max_tokens=MAX_TOKENS)
        return completion.choices[0].message.content

    async def post(messages: list[dict[str, Any]]) -> Any:
        body = json_body({"model": MODEL, "max_tokens": MAX_TOKENS}, messages)
        response = await client.post("/chat/completions", cast_to=httpx.Response, content=body)
        return json.loads(response.content)["choices"][0]["message"]["content"]

    return {"sdk create": (create, client), "sdk post": (post, client)}


def _raw_http_client(transport: str, connections: int) -> Any:
    pool = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    if transport == "aiohttp":
        return openai.DefaultAioHttpClient(limits=pool)
    return openai.DefaultAsyncHttpxClient(limits=pool)


def runner_paths(url: str, transport: str, concurrency: int, workdir: Path) -> dict[str, tuple[Send, Any]]:
    """The runner's ChatClient, typed path and raw path."""
    raw = job_dict(workdir / "m.csv", workdir / "out", url, concurrency=concurrency, http_client=transport)
    job = job_from_dict(raw, base_dir=workdir)
    full = ChatClient(job, api_key="sk-bench")
    full.full_sdk_path = True
    cheap = ChatClient(job, api_key="sk-bench")
    return {"ChatClient full": (full.complete, full), "ChatClient cheap": (cheap.complete, cheap)}


async def run(url: str, workdir: Path, requests: int, concurrency: int, rounds: int) -> dict[tuple[str, str], list]:
    messages = messages_for(workdir)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for transport in ("httpx", "aiohttp"):
        paths = {**sdk_paths(url, transport, concurrency), **runner_paths(url, transport, concurrency, workdir)}
        for _ in range(rounds):
            for name, (send, _) in paths.items():
                results.setdefault((transport, name), []).append(await measure(send, messages, requests,
                                                                               concurrency))
        for _, owner in paths.values():
            await owner.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per path and round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwenvl-sdk-floor-") as tmp, simulator_process() as sim:
        workdir = Path(tmp)
        synthetic_images(workdir / "img", 1)
        results = asyncio.run(run(sim.url, workdir, args.requests, args.concurrency, args.rounds))
    print(f"openai {openai.__version__}, {args.requests:,} requests per path and round, C={args.concurrency}, "
          f"median of {args.rounds} round(s); CPU of this process only (the simulator runs in its own)")
    print("| transport | path | requests/s | CPU ms/request |\n|---|---|---|---|")
    for (transport, name), runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"| {transport} | {name} | {rate:,.0f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
