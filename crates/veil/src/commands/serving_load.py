"""Drives an OpenAI-compatible server with the official `openai` package, as a user's program
would: N concurrent streamed chat completions (AsyncOpenAI), each asking MAX_TOKENS greedy
tokens. Prints one JSON line: tokens received, wall time, each request's time to first token.
PROMPTS is `same` (every request asks the same story) or `distinct` (each asks about its own
subject, so no two prompts share more than the chat template and the first words).

Usage: serving_load.py BASE_URL MODEL N MAX_TOKENS PROMPTS"""

import asyncio
import json
import sys
import time

from openai import AsyncOpenAI

PROMPT = "Write a long story about a lighthouse keeper and the sea."

SUBJECTS = [
    "a lighthouse keeper and the sea",
    "a baker who cannot sleep",
    "two rival beekeepers",
    "a train that never arrives",
    "the last bookshop in a mountain town",
    "a clockmaker's apprentice",
    "a river that floods every spring",
    "a girl who maps the stars",
    "an old dog and a new puppy",
    "the night market in a desert city",
    "a bridge built over eleven years",
    "a violinist who lost her hearing",
    "a fisherman and a talking gull",
    "a robot learning to garden",
    "a village under the snow",
    "a letter delivered fifty years late",
]


def prompt_of(i, prompts):
    if prompts == "same":
        return PROMPT
    return "Write a long story about " + SUBJECTS[i % len(SUBJECTS)] + "."


async def one(client, model, max_tokens, prompt):
    started = time.perf_counter()
    first, chunks, usage = None, 0, None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - started
            chunks += 1
    return (usage if usage is not None else chunks), first


async def main():
    base, model, n, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompts = sys.argv[5]
    if prompts not in ("same", "distinct"):
        sys.exit("PROMPTS must be `same` or `distinct`")
    client = AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    started = time.perf_counter()
    results = await asyncio.gather(
        *(one(client, model, max_tokens, prompt_of(i, prompts)) for i in range(n))
    )
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "tokens": sum(r[0] for r in results),
                "seconds": wall,
                "ttft_ms": [1000 * r[1] for r in results if r[1] is not None],
            }
        )
    )


asyncio.run(main())
