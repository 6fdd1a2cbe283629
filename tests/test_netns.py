"""Several hosts: three network namespaces on one bridge (veth pairs), a ring job
across their addresses through a hostfile; one host's link goes down in the middle
of the collectives: the other ranks raise a typed error within the deadline.

Needs root and iproute2 (network namespaces); fails, saying which is missing,
without them. Addresses exist only inside the namespaces created here. The side channel's address is
agreed over the ring itself (no MLXDIST_STORE): rank 0 listens on its hostfile
address only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.netns import bridged_hosts, ip

TIMEOUT = 3.0
MARGIN = 2.0
SUBNET = "10.213.77"

@pytest.fixture
def hosts():
    """Three namespaces (and a switch namespace holding the bridge); yields their names and addresses."""
    with bridged_hosts(3, SUBNET) as made:
        yield made.names, made.addresses, made.switch, made.switch_ports


@pytest.mark.parametrize("op", ("all_sum", "all_gather"))
def test_link_down_mid_collective_gives_typed_errors(hosts, op):
    names, addresses, switch, switch_ports = hosts
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = Path(tmp, "hosts.json")
        hostfile.write_text(json.dumps([[f"{a}:{29500 + i}"] for i, a in enumerate(addresses)]))
        env = dict(os.environ, PYTHONUNBUFFERED="1", MLX_HOSTFILE=str(hostfile))
        for key in ("MLXDIST_STORE", "MLXDIST_JOB_TOKEN", "MLXDIST_REPORT"):
            env.pop(key, None)
        procs, logs = [], []
        for rank, ns in enumerate(names):
            log = Path(tmp, f"rank{rank}.log")
            logs.append(log)
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "mlxdist.bench.fault_rank", "none", op, "65536", str(TIMEOUT), "2", "0"],
                env=dict(env, MLX_RANK=str(rank)), stdout=log.open("w"), stderr=subprocess.STDOUT,
                start_new_session=True))
        try:
            limit = time.monotonic() + 60
            while not all("READY" in log.read_text() for log in logs):
                assert time.monotonic() < limit, "".join(log.read_text() for log in logs)
                assert all(p.poll() is None for p in procs), "".join(log.read_text() for log in logs)
                time.sleep(0.05)
            time.sleep(0.3)
            down_at = time.time()
            ip("-n", switch, "link", "set", switch_ports[2], "down")  # host 2 is cut off
            limit = time.monotonic() + TIMEOUT + 20
            while any(p.poll() is None for p in procs[:2]):
                assert time.monotonic() < limit, "hang: " + "".join(log.read_text() for log in logs)
                time.sleep(0.02)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                p.wait()
        outputs = [log.read_text(errors="replace") for log in logs]
    for rank in (0, 1):
        m = re.search(rf"RESULT {rank} (\w+) ([\d.]+) (.*)", outputs[rank])
        assert m, outputs
        assert m.group(1) in ("DeadlineExceeded", "PeerLostError"), m.group(0)
        assert float(m.group(2)) - down_at <= TIMEOUT + MARGIN, (float(m.group(2)) - down_at, m.group(0))
        assert "2" in m.group(3), m.group(0)  # names the cut-off rank
