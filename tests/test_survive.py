"""mlxdist-serve survives the loss of ranks: the world re-forms on the ranks left and the requests go on.

One server per backend, each walked through several losses:

- ring, 3 ranks, a mixture-of-experts checkpoint with ``--experts ep``:
  kill -9 of rank 2 during a 32-token greedy stream (and a seeded sampled
  one); both complete with the tokens of an undisturbed run (mlxdist.lm's
  one-process generation; the same sampled request on the undisturbed
  world); /health reports 2 ranks and their plan, the experts placed again
  over the 2 ranks. Then kill -9 of rank 0 of the new world, a request sent
  while the world re-forms: it is served after it, by 1 rank.
- MPI, 3 ranks, ``--min-ranks 2``, the same checkpoint with ``--experts tp``
  (every expert's features split over 3 ranks, then over 2): SIGSTOP of rank 1 once a 512-token greedy
  stream (seen through the per-operation deadline): the stream completes with
  the undisturbed tokens; a request sent while the world re-forms gets 503
  with Retry-After past the bound. Then kill -9 of rank 0 of the 2-rank world:
  1 rank is below --min-ranks, so the server reports failed and exits
  non-zero naming the lost rank.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

import httpx
from support.serving import ServeProcess, greedy_reference
from support.serving import stream_text as stream_completion

from mlxdist.lm.testing import write_checkpoint

os.environ["HF_HUB_OFFLINE"] = "1"

# 8 heads: TP at 2 ranks, uneven TP at 3. Deep enough that a token takes a few collectives' time: a loss
# lands inside a 32-token stream (on 3 ring ranks, which spin while they wait on 2 cores, a token of
# the 6-layer model takes ~0.2 s; MPI's stall needs the 12-layer one to find its stream running).
DIMS = dict(hidden_size=128, num_heads=8, num_kv_heads=4, intermediate_size=256, vocab_size=512)
RING_LAYERS, MPI_LAYERS = 6, 12
START_DEADLINE = 120.0
TIMEOUT = 10.0  # the ranks' per-operation deadline (a step may take seconds on a loaded machine)
TEXT = "/v1/completions"
PROMPT = "mlx"
MAX_TOKENS = 32
# The stalled stream's length. On MPI the engine runs far ahead of the client (hundreds of tokens while
# the client reads a few): the stall strikes once the stream opened, so it finds the request running.
LONG_TOKENS = 512


EXPERTS = 4  # whole experts per rank under EP: 2, 1, 1 at 3 ranks, 2, 2 at 2


def moe_checkpoint(tmp_path_factory, layers: int, longest: int) -> tuple[Path, Any]:
    """A mixture-of-experts checkpoint (a dense one re-forms in tests/test_survive_hosts.py) and
    ``reference(max_tokens)``: the undisturbed greedy run of PROMPT in one process (mlxdist.lm), as text."""
    path = write_checkpoint(tmp_path_factory.mktemp(f"survive{layers}") / "tiny-deep", family="qwen3_moe",
                            dtype="float32", num_experts=EXPERTS, num_layers=layers, **DIMS)
    return path, greedy_reference(path, PROMPT, longest, MAX_TOKENS)


@pytest.fixture(scope="module")
def ring_case(tmp_path_factory) -> tuple[Path, Any]:
    return moe_checkpoint(tmp_path_factory, RING_LAYERS, MAX_TOKENS)


@pytest.fixture(scope="module")
def mpi_case(tmp_path_factory) -> tuple[Path, Any]:
    return moe_checkpoint(tmp_path_factory, MPI_LAYERS, LONG_TOKENS)


class Server(ServeProcess):
    """A running ``mlxdist-serve -n 3`` (the supervising process and its ranks)."""

    def __init__(self, checkpoint: Path, backend: str, log: Path, *extra: str) -> None:
        super().__init__(checkpoint, backend, log, 3, "--timeout", str(TIMEOUT), *extra)

    def wait_for(self, ranks: int, deadline: float = START_DEADLINE) -> dict[str, Any]:
        return super().wait_for(ranks, deadline)


@pytest.fixture
def servers(tmp_path) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    yield started
    for server in started.values():
        server.close()


STRIKE_AT = 1  # tokens streamed before the loss (the engine runs ahead of the client)


def stream_text(server: Server, body: dict[str, Any], strike: Optional[Any] = None, strike_at: int = STRIKE_AT) -> str:
    """Stream a completion of PROMPT; call ``strike()`` once ``strike_at`` tokens arrived (0: once it opened)."""
    return stream_completion(server, {"model": "tiny-deep", "prompt": PROMPT, **body}, strike, strike_at)


def complete(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + TEXT, json={"model": "tiny-deep", "prompt": PROMPT, **body}, timeout=120)


def in_background(function: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = function(*args)
        except BaseException as exc:  # handed to the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def joined(thread: threading.Thread, out: dict[str, Any], timeout: float = 120) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), "a request never ended"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.timeout(300)
def test_ring_moe_world_re_forms_twice_re_placing_experts_and_streams_finish_with_undisturbed_tokens(
        ring_case, servers, tmp_path):
    checkpoint, reference = ring_case
    server = servers["ring"] = Server(checkpoint, "ring", tmp_path / "ring.log", "--experts", "ep")
    health = server.wait_for(3)
    # 3 ranks do not divide 8 query heads: uneven TP (then even TP at 2, then one rank).
    assert health["plan"]["mode"] == "tp" and "uneven" in health["plan"]["reason"], health
    assert health["plan"]["experts"] == "ep" and health["plan"]["shares"]["experts"] == [2, 1, 1], health
    sampled = {"max_tokens": MAX_TOKENS, "temperature": 0.9, "seed": 11}
    undisturbed_sample = stream_text(server, sampled)
    pids = health["plan"]["pids"]

    sample_thread, sample_out = in_background(stream_text, server, sampled)
    greedy = stream_text(server, {"max_tokens": MAX_TOKENS, "temperature": 0},
                         strike=lambda: os.kill(pids[2], signal.SIGKILL))
    assert greedy == reference(MAX_TOKENS)
    assert joined(sample_thread, sample_out) == undisturbed_sample
    health = server.wait_for(2)
    assert health["plan"]["mode"] == "tp", health
    # The new world planned again: whole experts over the 2 ranks left, the heads split evenly.
    shares = health["plan"]["shares"]
    assert health["plan"]["experts"] == "ep" and shares["expert_ranges"] == [[0, 2], [2, EXPERTS]], health
    assert shares["query_heads"] == [4, 4] and len(health["plan"]["rank_bytes"]) == 2, health
    formed = health["plan"]["re_formed"]
    assert formed["from_ranks"] == 3 and formed["lost_ranks"] == [2], formed
    # The streams were in flight when the world was lost, the greedy one part way.
    assert formed["resumed"] == 2 and all(t < MAX_TOKENS for t in formed["resumed_after_tokens"]), formed
    print("ring 3 -> 2:", formed)

    pids = health["plan"]["pids"]
    os.kill(pids[0], signal.SIGKILL)
    server.wait_state("re-forming")
    waiting_thread, waiting_out = in_background(complete, server, {"max_tokens": 16, "temperature": 0})
    response = joined(waiting_thread, waiting_out)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == reference(16)
    # The new world's ranks hold no prompt cache entry of the lost worlds (which served this prompt):
    # the first request prefills in full, the same one again reuses it.
    assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = complete(server, {"max_tokens": 16, "temperature": 0}).json()
    assert again["choices"][0]["text"] == reference(16)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    health = server.health()
    assert health["state"] == "ready" and health["plan"]["ranks"] == 1 and health["plan"]["mode"] == "single", health
    assert health["plan"]["re_formed"]["from_ranks"] == 2, health
    log = server.text()
    assert re.search(r"world 1 lost rank\(s\) \[2\]", log), log[-3000:]
    assert re.search(r"first token after the loss: [0-9.]+ s", log), log[-3000:]



@pytest.mark.timeout(300)
def test_mpi_world_re_forms_after_a_stall_then_fails_below_min_ranks(mpi_case, servers, tmp_path):
    checkpoint, reference = mpi_case
    server = servers["mpi"] = Server(checkpoint, "mpi", tmp_path / "mpi.log", "--min-ranks", "2",
                                     "--reform-wait", "1", "--experts", "tp")
    health = server.wait_for(3)
    features = DIMS["intermediate_size"]
    split = health["plan"]["shares"]["expert_features"]
    assert health["plan"]["experts"] == "tp" and sum(split) == features and len(split) == 3, health
    pids = health["plan"]["pids"]
    stopped: dict[str, float] = {}

    def stop_rank_1() -> None:
        os.kill(pids[1], signal.SIGSTOP)
        stopped["at"] = time.monotonic()

    greedy_thread, greedy_out = in_background(
        stream_text, server, {"max_tokens": LONG_TOKENS, "temperature": 0}, stop_rank_1, 0)
    health = server.wait_state("re-forming", deadline=TIMEOUT + 20)
    seen = time.monotonic() - stopped["at"]
    refused = complete(server, {"max_tokens": 4})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", (refused, refused.headers)
    assert refused.json()["error"]["code"] == "re_forming"
    assert joined(greedy_thread, greedy_out) == reference(LONG_TOKENS)
    health = server.wait_for(2)
    # Every expert's features split again, evenly over the 2 ranks left.
    assert health["plan"]["shares"]["expert_features"] == [features // 2] * 2, health
    formed = health["plan"]["re_formed"]
    assert formed["lost_ranks"] == [1] and formed["resumed"] == 1, formed
    assert formed["resumed_after_tokens"][0] < LONG_TOKENS, formed
    assert formed["how"].startswith("deadline;"), formed  # seen through the per-operation deadline
    print(f"mpi 3 -> 2: stall seen after {seen:.1f} s;", formed)

    os.kill(health["plan"]["pids"][0], signal.SIGKILL)
    health = server.wait_state("failed", deadline=TIMEOUT + 20)
    assert health["failed_ranks"] == [0], health
    assert server.proc.wait(30) != 0
    log = server.text()
    assert re.search(r"mlxdist-serve: failed \(rank 0\): .*lost rank 1 of 3, rank 0 of 2: 1 rank\(s\) left, "
                     r"below --min-ranks 2", log), log[-3000:]


def test_a_resumed_sampler_makes_the_draws_an_undisturbed_one_makes_next():
    import mlx.core as mx

    from mlxdist.serve.protocol import ProtocolError, check
    from mlxdist.serve.sampling import SeededSampler

    logprobs = mx.log(mx.softmax(mx.random.normal((1, 64), key=mx.random.key(3)), axis=-1))
    undisturbed = SeededSampler(0.9, 0.95, seed=11)
    draws = [int(undisturbed(logprobs)[0]) for _ in range(40)]
    resumed = SeededSampler(0.9, 0.95, seed=11, drawn=25)
    assert [int(resumed(logprobs)[0]) for _ in range(15)] == draws[25:]
    fresh = SeededSampler(0.9, 0.95, seed=11)
    assert [int(fresh(logprobs)[0]) for _ in range(15)] != draws[25:]  # the skip is what makes them equal

    from mlxdist.serve.validation import Sampling

    resume = {"type": "resume", "id": "r", "prompt": [1, 2, 3], "drawn": 2,
              **Sampling(max_tokens=4, temperature=0.0, seed=0).link_fields()}
    assert check(resume) == resume
    with pytest.raises(ProtocolError, match="fields"):
        check({k: v for k, v in resume.items() if k != "drawn"})
