"""Bad launch configurations, in a fresh interpreter with a deadline.

MLX reads them itself with few checks (a negative rank segfaults, an empty
hostfile is a SIGFPE, "abc" is rank 0, a one-rank ring waits ~31 s); mlxdist
validates them first. Every case must end, before MLX would wait, in a
:class:`mlxdist.ConfigurationError` (an InitializationError, a ValueError and a
DistributedError) whose message names the entry at fault, for ``init()`` as a
user calls it and for ``init("ring", strict=True)``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from mlxdist.launch import free_ports

# One interpreter runs every case in turn (mlxdist refuses each before MLX sees it, so no
# case leaves MLX initialised): argv holds a JSON list of [case, MLX_RANK, MLX_HOSTFILE].
# Each line: the case, how the call ended, the seconds init() itself took, the exception's
# class and message; "DONE" closes a case, so a crash names the case it happened in.
PROBE = """
import json, os, sys, time
import mlxdist
for case, rank, hostfile in json.loads(sys.argv[1]):
    os.environ.update(MLX_RANK=rank, MLX_HOSTFILE=hostfile)
    print("CASE", case, flush=True)
    for args in ((), ("ring", True)):
        start = time.monotonic()
        try:
            mlxdist.init(*args)
        except mlxdist.ConfigurationError as e:
            ok = isinstance(e, ValueError) and isinstance(e, mlxdist.InitializationError)
            print("typed" if ok else "mistyped", f"{time.monotonic() - start:.3f}", type(e).__name__, e, flush=True)
        except BaseException as e:
            print("untyped", f"{time.monotonic() - start:.3f}", type(e).__name__, e, flush=True)
        else:
            print("accepted", flush=True)
    print("DONE", flush=True)
"""
# MLX's own waits on a bad ring configuration (a one-rank ring waits ~31 s): a call
# that took this long reached MLX instead of being refused by mlxdist's checks.
MLX_WAITED = 10.0


def two_hosts() -> list[list[str]]:
    a, b = free_ports(2)
    return [[f"127.0.0.1:{a}"], [f"127.0.0.1:{b}"]]


CASES = {
    # name: (MLX_RANK, hostfile document (None: the default two hosts), what the message names)
    "rank -1": ("-1", None, "MLX_RANK='-1'"),
    "rank abc": ("abc", None, "MLX_RANK='abc'"),
    "rank empty": ("", None, "MLX_RANK"),
    "rank 1.0": ("1.0", None, "MLX_RANK='1.0'"),
    "rank past the hostfile": ("2", None, "MLX_RANK=2"),
    "hostfile []": ("0", [], "0 rank(s)"),
    "hostfile one entry": ("0", "one", "1 rank(s)"),
    "hostfile {'hosts': 1}": ("0", {"hosts": 1}, "dict"),
    "hostfile [[1], [2]]": ("0", [[1], [2]], "address 0 is 1"),
    "hostfile [[], []]": ("0", [[], []], "rank 0's entry is []"),
    "hostfile ['a', 'b']": ("0", ["127.0.0.1:1", "127.0.0.1:2"], "rank 0's entry"),
    "port 99999": ("0", "port", "port 99999"),
    "port 0": ("0", "port0", "port 0"),
    "no port": ("0", [["127.0.0.1"], ["127.0.0.1:2"]], "'127.0.0.1'"),
    "not an address": ("0", [["no-such-host.invalid:5000"], ["127.0.0.1:5001"]], "no-such-host.invalid"),
    "uneven address counts": ("0", "uneven", "different numbers"),
    "hostfile not JSON": ("0", "notjson", "not valid JSON"),
    "hostfile missing": ("0", "missing", "cannot read"),
    "port in use": ("0", "busy", "in use"),
}


def write_hostfile(tmp_path, document):  # type: ignore[no-untyped-def]
    hosts = two_hosts()
    path = tmp_path / "hosts.json"
    if document == "one":
        document = hosts[:1]
    elif document == "port":
        document = [["127.0.0.1:99999"], hosts[1]]
    elif document == "port0":
        document = [["127.0.0.1:0"], hosts[1]]
    elif document == "uneven":
        document = [hosts[0] * 2, hosts[1]]
    elif document is None or document == "busy":
        document = hosts
    if document == "notjson":
        path.write_text('[["127.0.0.1:1"],')
    elif document != "missing":
        path.write_text(json.dumps(document))
    return path, document


def test_bad_ring_configurations_are_typed(tmp_path):
    # One fresh interpreter for all the cases, under one deadline; each case tries
    # init() as a user calls it and then init("ring", strict=True).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "PMI"))}
    busy = socket.socket()
    cases = []
    try:
        for case, (rank, document, _) in sorted(CASES.items()):
            folder = tmp_path / case.replace(" ", "_").replace("/", "_")
            folder.mkdir()
            path, document = write_hostfile(folder, document)
            if case == "port in use":
                host, port = document[0][0].split(":")
                busy.bind((host, int(port)))
                busy.listen()
            cases.append([case, rank, str(path)])
        done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        busy.close()
    answers: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("CASE "):
            case = line[5:]
            answers[case] = []
        else:
            answers[case].append(line)
    problems = []
    for case, _, _ in cases:
        lines = answers.get(case)
        if lines is None or lines[-1:] != ["DONE"] or len(lines) != 3:
            problems.append(f"{case}: {lines!r} (exit {done.returncode}) {done.stderr[-500:]!r}")
            continue
        for line in lines[:2]:
            verdict, seconds, rest = (line.split(" ", 2) + ["", ""])[:3]
            if verdict != "typed" or not rest.startswith("ConfigurationError") or CASES[case][2] not in rest:
                problems.append(f"{case}: {line}")
            elif float(seconds) >= MLX_WAITED:
                problems.append(f"{case}: init() took {seconds} s: MLX waited, mlxdist did not refuse it first")
    assert done.returncode == 0 and not problems, "\n".join(problems)
