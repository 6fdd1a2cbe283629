"""mlxdist-serve across hosts from a hostfile: the world re-forms without the lost host.

Three network namespaces on a bridge stand for three hosts, and the test's own
namespace has an address on the same bridge (the supervisor's link listens
there). ``--ssh`` is a fake remote shell: ``SHELL HOST COMMAND`` runs the one
command string in HOST's namespace through ``sh -c``, so the remote path is
the real one (quoting, variables on the command line, the ring hostfile
written on the host, a rank ended when its standard input closes). Scenario:
3 hosts serving; kill -9 of host 2's rank during a 64-token greedy stream:
the stream completes with the undisturbed tokens, the new world runs on
host 0 and host 1 with fresh ring ports on their addresses; SIGTERM to the
supervisor then ends every rank and every remote bootstrap. And with two
hosts: both ranks stopped (SIGSTOP), then kill -9 of the supervisor: the
bootstraps see their standard input close and end the ranks.

The namespace tests need root and iproute2, and fail, saying which is missing,
without them; the hostfile's checks, the remote command's words and the
bootstrap's end on EOF need neither.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from support.netns import bridged_hosts

from mlxdist.errors import ConfigurationError
from mlxdist.hostfiles import read_launch_hostfile
from mlxdist.launch import plan_job

SUBNET = f"10.{214 + os.getpid() % 40}.{os.getpid() // 40 % 250}"
STARTING_PORT = 34500
PROMPT = "mlx"
MAX_TOKENS = 64


def hostfile_of(tmp_path: Path, entries: list[tuple[str, str]]) -> Any:
    """Write a hostfile of ``(ssh, ip)`` entries; read it back."""
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([{"ssh": name, "ips": [address]} for name, address in entries]))
    return read_launch_hostfile(str(path))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _bootstraps(marker: str) -> list[int]:
    """Processes of mlxdist.launch.remote whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "mlxdist.launch.remote" in cmdline and marker in cmdline and _alive(int(entry)):
                found.append(int(entry))
    return found


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON"),
    ('{"ssh": "a", "ips": ["10.0.0.1"]}', "non-empty JSON list"),
    ("[]", "non-empty JSON list"),
    ('[{"ssh": "a", "ips": ["10.0.0.1"]}, "b"]', "entry 1 must be an object"),
    ('[{"ips": ["10.0.0.1"]}]', "entry 0: 'ssh'"),
    ('[{"ssh": "-oProxyCommand=x", "ips": ["10.0.0.1"]}]', "option of the remote shell"),
    ('[{"ssh": "a", "ips": []}]', "entry 0 (a): 'ips'"),
    ('[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.300"]}]', "entry 1 (b): ip is '10.0.0.300'"),
])
def test_a_bad_hostfile_is_a_typed_error_naming_the_entry(tmp_path, content, words):
    path = tmp_path / "hosts.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=re.escape(words)):
        read_launch_hostfile(str(path))
    with pytest.raises(ConfigurationError, match="cannot read"):
        read_launch_hostfile(str(tmp_path / "missing.json"))


def test_the_server_names_a_bad_hostfile_and_exits_2(tmp_path, capsys, monkeypatch):
    # The server's command line in process (python -m mlxdist.serve runs this main): the
    # hostfile is refused before anything starts.
    from mlxdist.serve.cli import main

    def exit_status(*words: str) -> tuple[int, str]:
        try:
            code = main(["--model", str(tmp_path), "--hostfile", str(path), *words])
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().err

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "hosts.json"
    path.write_text('[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b"}]')
    for extra, words in (([], "entry 1 (b): 'ips'"), (["--backend", "mpi"], "--hostfile is for --backend ring")):
        code, err = exit_status(*extra)
        assert code == 2 and words in err and "Traceback" not in err, err
    path.write_text('[{"ssh": "a", "ips": ["10.0.0.1"]}]')
    code, err = exit_status("-n", "2")
    assert code == 2 and "-n 2 but the hostfile" in err, err


def test_the_next_world_leaves_out_every_named_rank_or_host(tmp_path):
    from mlxdist.serve.supervisor import next_world

    assert next_world(4, None, [0, 2]) == (2, [], [])
    assert next_world(4, None, []) == (3, [], [])
    assert next_world(4, None, [7]) == (3, [], [])  # not a rank of that world: one fewer
    a, b, c = hostfile_of(tmp_path, [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")])
    assert next_world(3, [a, b, c], [1]) == (2, [a, c], [b])
    assert next_world(3, [a, b, c], [0, 2]) == (1, [b], [a, c])
    assert next_world(3, [a, b, c], []) == (2, [a, b], [c])


def test_a_remote_rank_command_carries_everything_and_its_rank_ends_on_eof(tmp_path):
    hosts = hostfile_of(tmp_path, [("a b", "10.0.0.1"), ("c", "10.0.0.2")])
    command = [sys.executable, "-c", "import os, time; print(os.environ['X'], open(os.environ['MLX_HOSTFILE']).read(), "
               "os.getcwd(), flush=True); time.sleep(60)"]
    with plan_job(command, hosts=hosts, remote_shell="env -o 'BatchMode=yes'", starting_port=40000,
                  env={"X": "it's $HOME"}) as plan:
        assert plan.addresses == ["10.0.0.1:40000", "10.0.0.2:40001"] and plan.hosts == ["a b", "c"]
        assert plan.commands[0][:4] == [plan.commands[0][0], "-o", "BatchMode=yes", "a b"]
        remote = plan.commands[1][4]
        assert remote.startswith(f"cd {shlex.quote(os.getcwd())} && exec env -u MLX_HOSTFILE"), remote
        assert "-u MLXDIST_STORE" in remote and "-u MLXDIST_REPORT" in remote and "MLX_RANK=1" in remote
    # What the host's shell runs, here: its rank prints, then ends once the launcher's pipe closes.
    proc = subprocess.Popen(["sh", "-c", remote], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("it's $HOME " + json.dumps([["10.0.0.1:40000"], ["10.0.0.2:40001"]])), line
        assert line.rstrip().endswith(os.getcwd()), line
        proc.stdin.close()
        assert proc.wait(20) == -signal.SIGTERM  # the rank was ended by SIGTERM, and the bootstrap with it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- across namespaces ------------------------------------------------------------------------------

DIMS = dict(hidden_size=128, num_layers=12, num_heads=8, num_kv_heads=4, intermediate_size=256, vocab_size=512)


@pytest.fixture
def network() -> Iterator[Any]:
    with bridged_hosts(3, SUBNET, root_address=True) as made:
        yield made


@pytest.fixture
def cluster(network, tmp_path) -> tuple[Path, Path, list[str]]:
    """The hostfile (hosts ``host0``..``host2``) and the fake remote shell over the namespaces
    (a script run by ``sh``: ``--ssh`` is split like a shell would)."""
    names = [f"host{i}" for i in range(3)]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": name, "ips": [address]}
                                    for name, address in zip(names, network.addresses)]))
    cases = "\n".join(f"  {name}) ns={ns} ;;" for name, ns in zip(names, network.names))
    shell = tmp_path / "fake-ssh"
    shell.write_text(f'#!/bin/sh\ncase "$1" in\n{cases}\n  *) echo "fake-ssh: unknown host $1" >&2; exit 255 ;;\n'
                     'esac\nexec ip netns exec "$ns" sh -c "$2"\n')
    return hostfile, shell, names


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from mlxdist.lm.testing import write_checkpoint

    os.environ["HF_HUB_OFFLINE"] = "1"
    return write_checkpoint(tmp_path_factory.mktemp("hosts") / "tiny-deep", family="llama", dtype="float32", **DIMS)


def serve(checkpoint: Path, hostfile: Path, shell: Path, log: Path) -> Any:
    """``mlxdist-serve --hostfile HOSTFILE`` through the fake remote shell."""
    from support.serving import ServeProcess

    return ServeProcess(checkpoint, "ring", log, None, "--hostfile", str(hostfile), "--ssh",
                        f"sh {shlex.quote(str(shell))}", "--starting-port", str(STARTING_PORT), "--timeout", "10")


def assert_nothing_left(server: Any) -> None:
    """Within 10 s, no rank the server ever ran and no remote bootstrap of this test is alive."""
    end = time.monotonic() + 10
    while time.monotonic() < end and (any(_alive(p) for p in server.pids) or _bootstraps(SUBNET)):
        time.sleep(0.1)
    assert not [p for p in server.pids if _alive(p)] and not _bootstraps(SUBNET), server.text()[-3000:]


def end_everything(server: Any) -> None:
    server.close()
    for pid in _bootstraps(SUBNET):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(180)
def test_the_world_re_forms_without_the_lost_host(network, cluster, checkpoint, tmp_path):
    from support.serving import greedy_reference, stream_text

    reference = greedy_reference(checkpoint, PROMPT, MAX_TOKENS, MAX_TOKENS)
    hostfile, shell, names = cluster
    ips = network.addresses
    assert read_launch_hostfile(str(hostfile))[2].ips == (ips[2],)
    server = serve(checkpoint, hostfile, shell, tmp_path / "serve.log")
    try:
        health = server.wait_for(3, 90)
        assert health["plan"]["hosts"] == names, health
        assert health["plan"]["addresses"] == [f"{ip}:{STARTING_PORT + r}" for r, ip in enumerate(ips)], health
        pids = health["plan"]["pids"]

        greedy = stream_text(server, {"model": "tiny-deep", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                      "temperature": 0}, strike=lambda: os.kill(pids[2], signal.SIGKILL))
        assert greedy == reference(MAX_TOKENS)
        health = server.wait_for(2, 60)
        plan = health["plan"]
        assert plan["hosts"] == names[:2], health
        assert plan["addresses"] == [f"{ip}:{STARTING_PORT + 3 + r}" for r, ip in enumerate(ips[:2])], health
        formed = plan["re_formed"]
        assert formed["from_ranks"] == 3 and formed["lost_ranks"] == [2] and formed["lost_hosts"] == ["host2"]
        assert formed["resumed"] == 1 and formed["resumed_after_tokens"][0] < MAX_TOKENS, formed
        log = server.text()
        assert re.search(r"world 1 lost rank\(s\) \[2\]", log), log[-3000:]
        assert f"world 2 on host(s) host0, host1 (ring {ips[0]}:{STARTING_PORT + 3}, {ips[1]}:{STARTING_PORT + 4})" \
            in log, log[-3000:]
        print("hosts 3 -> 2:", formed)
        print(next(line for line in log.splitlines() if "first token after the loss" in line))
        assert _bootstraps(SUBNET), "no remote bootstrap seen"

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(40) == 0, server.text()[-3000:]
        assert_nothing_left(server)
    finally:
        end_everything(server)


@pytest.mark.timeout(120)
def test_a_killed_supervisor_leaves_no_remote_rank_behind(network, cluster, checkpoint, tmp_path):
    _, shell, names = cluster
    hostfile = tmp_path / "two.json"
    hostfile.write_text(json.dumps([{"ssh": n, "ips": [ip]} for n, ip in zip(names[:2], network.addresses)]))
    server = serve(checkpoint, hostfile, shell, tmp_path / "serve.log")
    try:
        pids = server.wait_for(2, 90)["plan"]["pids"]
        assert _bootstraps(SUBNET), "no remote bootstrap seen"
        # Stopped ranks cannot notice the link or the ring going away: only their bootstraps end them,
        # once the supervisor's end of their standard input closes with it.
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        server.proc.kill()
        server.proc.wait(10)
        assert_nothing_left(server)
    finally:
        end_everything(server)
