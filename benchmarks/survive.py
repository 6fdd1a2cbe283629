"""Time from a rank's loss to the first token after it, split into its parts, for mlxdist-serve.

    python benchmarks/survive.py [--backends ring,mpi] [--models float,q4,large] [--large-gb 1.0]
        [--trials 1] [--json out.json]

For each backend and checkpoint: start ``mlxdist-serve -n 3``, open a long
greedy stream, SIGKILL rank 2 once its first token arrived, and read the
stream to its end. The server's ``/health`` then holds the re-forming's
timeline (``plan.re_formed``): when the loss was seen, and the parts up to
the first token after it. Detection is the time from the kill (this
process's clock) to the moment the server saw the loss. Parts:

- detection: kill -> the server saw the world fail
- teardown: ending what was left of the old world
- start: starting the new ranks until rank 0's group formed (process start,
  imports, mlxdist.init)
- load: reading the checkpoint, sharding it and evaluating the rank's weights
  (block by block), the tokenizer
- plan: choosing the plan for the new size (mlxdist.lm's dispatcher)
- engine: building the engine and gathering the ranks' pids, until ``ready``
- resume: ``ready`` -> the first resumed token (prompt and generated tokens
  prefilled again)

The checkpoints are random-weight ones written here with
:func:`mlxdist.lm.testing.write_checkpoint`: ``float`` and ``q4`` are the
test suite's tiny llama (float32, and 4-bit), ``large`` a float16 llama of
about ``--large-gb`` GB, where loading dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from mlxdist.lm.testing import write_checkpoint

TINY = dict(hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=256, vocab_size=512)
PARTS = ("detection", "teardown", "start", "load", "plan", "engine", "resume")


def large_dims(gigabytes: float) -> dict[str, int]:
    """A float16 llama of about ``gigabytes`` GB (8 heads, so 2 ranks run TP and 3 PP)."""
    hidden, intermediate, vocab = 2048, 5632, 512  # the test tokenizer has at most 935 ids
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * hidden // 2 + 3 * hidden * intermediate)
    layers = max(3, round((gigabytes * 1e9 - 2 * 2 * vocab * hidden) / per_layer))
    return dict(hidden_size=hidden, num_layers=layers, num_heads=16, num_kv_heads=8,
                intermediate_size=intermediate, vocab_size=vocab)


def checkpoint(kind: str, root: Path, large_gb: float) -> Path:
    if kind == "float":
        return write_checkpoint(root / "float", family="llama", dtype="float32", **TINY)
    if kind == "q4":
        return write_checkpoint(root / "q4", family="llama", dtype="float32", bits=4, group_size=32, **TINY)
    return write_checkpoint(root / "large", family="llama", dtype="float16", **large_dims(large_gb))


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def trial(model: Path, backend: str, log: Path, timeout: float, max_tokens: int) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxdist.serve", "--model", str(model), "-n", "3", "--backend", backend,
         "--port", "0", "--timeout", str(timeout)],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
    pids: list[int] = []
    try:
        url = ""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            match = re.search(r"serving on (http://\S+)/v1", log.read_text())
            if match:
                url = match.group(1)
                try:
                    health = httpx.get(url + "/health", timeout=5).json()
                except httpx.HTTPError:
                    health = {}
                if health.get("state") == "ready":
                    pids = health["plan"]["pids"]
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
        killed = 0.0
        body = {"model": model.name, "prompt": "mlx", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=900) as response:
            for line in response.iter_lines():
                if not killed and line.startswith("data: {"):
                    os.kill(pids[2], signal.SIGKILL)
                    killed = time.time()
                assert not line.startswith("event: error"), line
        formed: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        asked = False
        while "parts" not in formed and time.monotonic() < deadline:
            health = httpx.get(url + "/health", timeout=10).json()
            formed = health["plan"].get("re_formed", {})
            if formed and "parts" not in formed and not asked and health["state"] == "ready":
                # The stream ended before the loss was seen: time the next request's first token instead.
                asked = True
                httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 1}, timeout=300)
            time.sleep(0.2)
        if "parts" not in formed:
            raise RuntimeError(f"no first token after the loss: {formed}")
        parts = {"detection": formed["seen_at"] - killed, **formed["parts"]}
        return {"parts": parts, "total": parts["detection"] + formed["first_token_seconds"],
                "resumed_after_tokens": formed["resumed_after_tokens"], "how": formed["how"][:120]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="ring,mpi")
    parser.add_argument("--models", default="float,q4,large")
    parser.add_argument("--large-gb", type=float, default=1.0)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0, help="the ranks' per-operation deadline")
    parser.add_argument("--max-tokens", type=int, default=64, help="the stream's length")
    parser.add_argument("--logs", help="keep the servers' logs in this directory")
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in args.models.split(","):
            began = time.monotonic()
            path = checkpoint(kind, root, args.large_gb)
            size = weights_bytes(path)
            print(f"# {kind}: {size / 1e9:.3f} GB of weights, written in {time.monotonic() - began:.1f} s",
                  flush=True)
            for backend in args.backends.split(","):
                for index in range(args.trials):
                    logs = Path(args.logs) if args.logs else root
                    row = {"model": kind, "gb": size / 1e9, "backend": backend,
                           **trial(path, backend, logs / f"{kind}-{backend}-{index}.log", args.timeout,
                                   args.max_tokens)}
                    rows.append(row)
                    parts = row["parts"]
                    print(f"{kind:6} {backend:4} total {row['total']:6.2f} s | "
                          + " ".join(f"{name} {parts[name]:.2f}" for name in PARTS)
                          + f" | load per GB of the checkpoint {(parts['load'] + parts['plan']) / (size / 1e9):.2f} s"
                          + f" | resumed after {row['resumed_after_tokens']} tokens", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
