"""What mx.distributed does with the misuse cases of tests/suites/misuse.py.

Each case runs in its own 2-rank launch (ring or MPI) with a deadline, so a
crash or a hang is recorded as such; configuration cases run mx.distributed's
init in a fresh interpreter. Prints one markdown row per case:

    python benchmarks/misuse_mx.py --backend ring   (and --backend mpi)
    python benchmarks/misuse_mx.py --config
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

# name -> the statement each rank runs (g: mx.distributed's group, r: the rank, peer: the other rank)
CASES: dict[str, str] = {
    "list as the array": "y = mx.distributed.all_sum([1.0, 2.0], group=g)",
    "None as the array": "y = mx.distributed.all_sum(None, group=g)",
    "numpy float64 in": "y = mx.distributed.all_sum(np.ones(2), group=g); print('dtype', y.dtype, type(y).__name__)",
    "mx float64 in": "y = mx.distributed.all_sum(mx.ones(2, dtype=mx.float64), group=g); print('dtype', y.dtype)",
    "complex128 numpy": "y = mx.distributed.all_sum(np.ones(2, np.complex128), group=g); print('dtype', y.dtype)",
    "big-endian numpy": "y = mx.distributed.all_sum(np.arange(3, dtype='>i4'), group=g)",
    "unicode numpy": "y = mx.distributed.all_sum(np.array(['a']), group=g)",
    "bool all_sum": "y = mx.distributed.all_sum(mx.array([True, False]), group=g)",
    "send to self": "y = mx.distributed.send(mx.ones(2), r, group=g)",
    "send to True": "y = mx.distributed.send(mx.ones(2), True, group=g) if r == 0 else mx.distributed.recv((2,), mx.float32, 0, group=g)",
    "send to -1": "y = mx.distributed.send(mx.ones(2), -1, group=g)",
    "send to size": "y = mx.distributed.send(mx.ones(2), 2, group=g)",
    "recv negative shape": "y = mx.distributed.recv((-2,), mx.float32, peer, group=g)",
    "recv dtype None": "y = mx.distributed.recv((2,), None, peer, group=g)",
    "recv 2**40 elements": "y = mx.distributed.recv((2**20, 2**20), mx.float32, peer, group=g)",
    "all_gather past int32": "y = mx.distributed.all_gather(mx.zeros((2**30 + 1, 0)), group=g)",
    "sum_scatter indivisible": "y = mx.distributed.sum_scatter(mx.ones(3), group=g)",
    "split(2**40)": "y = g.split(2**40)",
    "split(-1)": "y = g.split(-1)",
    "stream='cpu'": "y = mx.distributed.all_sum(mx.ones(2), group=g, stream='cpu')",
    "stream=mx.gpu (CPU build)": "y = mx.distributed.all_sum(mx.ones(2), group=g, stream=mx.gpu)",
    "group='x'": "y = mx.distributed.all_sum(mx.ones(2), group='x')",
    "init('carrier-pigeon')": "y = mx.distributed.init(backend='carrier-pigeon'); print('size', y.size())",
    "init(123)": "y = mx.distributed.init(backend=123)",
    "mx.zeros((2**20, 2**20))": "y = mx.zeros((2**20, 2**20))",
    "two split groups, one thread each": (
        "import threading\n"
        "subs = [g.split(0), g.split(0)]\n"
        "out = []\n"
        "def work(k):\n"
        "    s = mx.new_stream(mx.cpu)\n"
        "    for i in range(20): out.append(mx.distributed.all_sum(mx.full((16,), k + i), group=subs[k], stream=s).tolist()[0] == 2 * (k + i))\n"
        "ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "y = mx.array(len(out)); print('sums', 'right' if all(out) else 'wrong', len(out))"
    ),
    "8 threads, one group": (
        "import threading\n"
        "out = []\n"
        "def work():\n"
        "    s = mx.new_stream(mx.cpu)\n"
        "    for _ in range(20): out.append(mx.distributed.all_sum(mx.ones(16), group=g, stream=s).tolist()[0])\n"
        "ts = [threading.Thread(target=work) for _ in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "y = mx.array(len(out)); print('sums', sorted(set(out)))"
    ),
}

RANK = """
import sys, traceback
import numpy as np
import mlx.core as mx
g = mx.distributed.init(strict=True)
r = g.rank(); peer = 1 - r
try:
{body}
    mx.eval(y)
    print("RESULT ok", repr(y)[:80].replace("\\n", " "), flush=True)
except BaseException as e:
    print("RESULT", type(e).__name__ + ":", str(e).splitlines()[0][:150] if str(e) else "", flush=True)
sys.stdout.flush()
"""


def run_case(name: str, backend: str, timeout: float) -> str:
    from mlxdist.launch import launch

    body = "\n".join("    " + line for line in CASES[name].splitlines())
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(RANK.format(body=body))
    start = time.monotonic()
    result = launch(
        [sys.executable, f.name],
        n=2,
        backend=backend,
        timeout=timeout,
        capture=True,
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    took = time.monotonic() - start
    os.unlink(f.name)
    lines = [line.strip() for line in result.output if "RESULT" in line]
    if result.timed_out:
        return f"hang (killed after {timeout:g} s); " + "; ".join(lines)
    codes = ",".join(str(c) for c in result.returncodes)
    extra = [line.strip() for line in result.output if "dtype" in line or "sums" in line or "size" in line][:2]
    summary = "; ".join(lines + extra) or "no output"
    return f"{summary} (exit codes {codes}, {took:.1f} s)"


CONFIG = {
    "MLX_RANK=-1": ("-1", "two"),
    "MLX_RANK=abc": ("abc", "two"),
    "hostfile []": ("0", []),
    'hostfile {"hosts": 1}': ("0", {"hosts": 1}),
    "hostfile [[1], [2]]": ("0", [[1], [2]]),
    "hostfile [[], []]": ("0", [[], []]),
    "port 99999": ("0", [["127.0.0.1:99999"], ["127.0.0.1:1"]]),
    "one-entry hostfile": ("0", [["127.0.0.1:45123"]]),
    "port in use": ("0", "busy"),
}


def run_config(name: str, timeout: float) -> str:
    rank, document = CONFIG[name]
    busy = None
    if document == "two":
        document = [["127.0.0.1:45121"], ["127.0.0.1:45122"]]
    elif document == "busy":
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        document = [[f"127.0.0.1:{busy.getsockname()[1]}"], ["127.0.0.1:45122"]]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(document, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "PMI"))}
    env.update(MLX_RANK=rank, MLX_HOSTFILE=f.name)
    code = (
        "import mlx.core as mx\n"
        "try:\n    g = mx.distributed.init(backend='ring', strict=True); print('ok rank', g.rank(), 'size', g.size())\n"
        "except BaseException as e:\n    print(type(e).__name__ + ':', str(e)[:150])\n"
    )
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
        out = p.stdout.strip() or p.stderr.strip().splitlines()[-1:] or [""]
        text = out if isinstance(out, str) else out[0]
        return f"{text} (exit {p.returncode}, {time.monotonic() - start:.1f} s)"
    except subprocess.TimeoutExpired:
        return f"hang (killed after {timeout:g} s)"
    finally:
        os.unlink(f.name)
        if busy is not None:
            busy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=("ring", "mpi"), default="ring")
    parser.add_argument("--config", action="store_true", help="the configuration cases instead")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--case", action="append", help="run only these cases")
    args = parser.parse_args()
    if args.config:
        for name in args.case or CONFIG:
            print(f"| {name} | {run_config(name, 45)} |", flush=True)
        return
    for name in args.case or CASES:
        print(f"| {name} | {args.backend} | {run_case(name, args.backend, args.timeout)} |", flush=True)


if __name__ == "__main__":
    main()
