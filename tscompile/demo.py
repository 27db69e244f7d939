"""The main job end to end (the README's first command runs this after compiling):
start `tsrun` on a compiled program, stream an answer to a chat question with the official
`openai` client, stop the server.

    python -m tscompile.demo PROGRAM --weights DIR [--question TEXT] [--max-tokens N]
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tscompile.runtime.distributed import free_port


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> bool:
    """Poll `url`/health until it answers 200 (True) or `timeout` seconds pass (False);
    raise if the server process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tsrun exited with code {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("program")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--question", default="What is the capital of France? Answer in one "
                                           "sentence.")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    import openai

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tsrun = Path(sys.executable).parent / "tsrun"
    cmd = [str(tsrun), args.program, "--weights", args.weights, "--port", str(port)]
    print("$ " + " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd)
    try:
        try:
            ready = wait_healthy(url, server, timeout=600)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        if not ready:
            print("tsrun did not become ready", file=sys.stderr)
            return 1
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        print(f"user: {args.question}\nassistant: ", end="", flush=True)
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.question}],
            max_tokens=args.max_tokens, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        return 0
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
