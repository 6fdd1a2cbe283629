"""The prompt cache of mlxdist-serve: rank 0's index (no launch), and served conversations at 2 ranks.

Two servers serve every launched check: ring with uneven TP (3 KV heads over
2 ranks) under the default bound, and MPI with uneven PP (1:3 layers) under a
bound that holds only a few conversations, so entries are evicted while the
checks run. Every answer is compared with greedy generation of the same prompt
ids in this process (no cache), and every ``cached_tokens`` with a model of
what the server can hold: the requests it was sent and the tokens it answered.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import httpx
import mlx.core as mx
import openai
from hypothesis import given, settings
from hypothesis import strategies as st
from support.serving import ServeProcess

from mlxdist.errors import InvalidArgumentError
from mlxdist.lm.testing import add_chat_template, write_checkpoint
from mlxdist.serve.prompt_cache import CacheIndex, CacheStore, Reuse, Share, plan_sharing

os.environ["HF_HUB_OFFLINE"] = "1"

# 3 KV heads: uneven over 2 ranks under TP.
DIMS = dict(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=3, intermediate_size=320, vocab_size=512)
NAME = "tiny-llama"
LONGEST = 2000  # tokens a stream may make: its client leaves long before
SMALL_BOUND = 1_500_000  # bytes: a few conversations of the PP server's larger shard (3 of 4 layers)
SERVERS = {
    "ring-tp": ("ring", ["--mode", "tp"]),
    "mpi-pp": ("mpi", ["--mode", "pp", "--pp-weights", "1,3", "--prompt-cache-bytes", str(SMALL_BOUND)]),
}


# -- rank 0's index, without ranks ---------------------------------------------------------


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_the_index_reuses_the_longest_prefix_and_keeps_the_last_token_to_compute():
    index = CacheIndex(10_000)
    assert index.add("a", [1, 2, 3, 4], 100, trimmable=True) == []
    assert index.add("b", [1, 2, 9], 100, trimmable=True) == []
    assert index.lookup([1, 2, 3, 4, 5]) == Reuse("a", 4)
    assert index.lookup([1, 2, 9, 9]) == Reuse("b", 3)
    assert index.lookup([1, 2, 3, 4]) == Reuse("a", 3)  # the whole prompt cached: its last token is run again
    assert index.lookup([7, 1, 2]) is None
    assert index.lookup([1]) is None
    # An entry that cannot be cut shorter is reused whole or not at all.
    assert index.add("c", [5, 6, 7], 100, trimmable=False) == []
    assert index.lookup([5, 6, 8]) is None
    assert index.lookup([5, 6, 7, 8]) == Reuse("c", 3)
    # A longer entry over the same tokens makes its prefixes redundant.
    assert index.add("d", [1, 2, 3, 4, 5, 6], 100, trimmable=True) == ["a"]
    with pytest.raises(InvalidArgumentError):
        CacheIndex(-1)


def test_a_cache_bounded_in_bytes_evicts_the_least_recently_used():
    index = CacheIndex(300)
    for key, tokens in (("a", [1, 1]), ("b", [2, 2]), ("c", [3, 3])):
        assert index.add(key, tokens, 100, trimmable=True) == []
    assert index.lookup([1, 1, 0]) == Reuse("a", 2)  # "a" is now the most recently used
    assert index.add("d", [4, 4], 150, trimmable=True) == ["b", "c"]
    assert (index.nbytes, len(index), "a" in index, "d" in index) == (250, 2, True, True)
    assert index.add("huge", [5, 5], 301, trimmable=True) == ["huge"]  # never fits: every rank drops it
    assert index.add("d", [4, 4, 4], 50, trimmable=True) == ["d"]  # a key stored again replaces its entry
    assert index.nbytes == 150


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=8), st.integers(1, 60),
                          st.booleans(), st.lists(st.integers(0, 3), min_size=0, max_size=8)),
                max_size=25),
       st.integers(0, 200))
def test_the_index_agrees_with_a_plain_lru_model(operations, bound):
    """After any sequence of stores and lookups: within the bound, the drops name every gone key
    once, and each lookup is the longest usable prefix over what a plain list still holds."""
    index = CacheIndex(bound)
    held: dict[str, tuple[list[int], int, bool]] = {}
    for k, (tokens, size, trimmable, prompt) in enumerate(operations):
        key = f"k{k}"
        dropped = index.add(key, tokens, size, trimmable=trimmable)
        assert len(set(dropped)) == len(dropped)
        held[key] = (tokens, size, trimmable)
        for gone in dropped:
            del held[gone]
        assert set(held) == {k for k in held if k in index} and len(index) == len(held)
        assert index.nbytes == sum(size for _, size, _ in held.values()) <= bound
        reuse = index.lookup(prompt)
        usable = [min(_lcp(t, prompt), len(prompt) - 1) for t, _, trim in held.values()
                  if trim or _lcp(t, prompt) == len(t) < len(prompt)]
        best = max([u for u in usable if u > 0], default=None)
        assert (reuse.tokens if reuse else None) == best
        if reuse is not None:
            assert _lcp(held[reuse.entry][0], prompt) >= reuse.tokens


def test_requests_arriving_together_share_one_prefill_of_their_common_prefix():
    system = list(range(100, 180))
    prompts = [system + [k] * 10 for k in range(3)] + [[7] * 50]
    shares, choice = plan_sharing(prompts, [None, Reuse("old", 20), None, None], {}, trimmable=True, key="s")
    # One entry of the 80 shared tokens, prefilled on top of the 20 the cache already gave the second.
    assert shares == [Share("s-0", tuple(system), None, Reuse("old", 20))]
    assert choice == [Reuse("s-0", 80)] * 3 + [None]
    # A running request whose cache holds the prefix is copied out instead: no prefill.
    running = {"r": system + [9, 9]}
    shares, choice = plan_sharing(prompts, [None] * 4, running, trimmable=True, key="s")
    assert shares == [Share("s-0", tuple(running["r"]), "r")] and choice == [Reuse("s-0", 80)] * 3 + [None]
    # Too little to gain: nothing planned.
    assert plan_sharing([p[:12] for p in prompts], [None] * 4, {}, trimmable=True, key="s") == ([], [None] * 4)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=90), min_size=1, max_size=6),
       st.lists(st.integers(0, 80), min_size=6, max_size=6),
       st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=90), max_size=3),
       st.booleans(), st.integers(1, 40))
def test_a_sharing_plan_only_points_requests_at_true_prefixes_that_spare_work(prompts, had, running, trimmable,
                                                                              min_gain):
    """Every request pointed at a shared entry takes a true prefix of its prompt (never its last token)
    from it, more than the prompt cache gave it; an entry it cannot use whole is only cut when caches can
    be; a prefilled entry spares its members more than its own prefill costs."""
    # Three-letter prompts share long prefixes often; a stem makes most share one.
    prompts = [[5] * 40 + p for p in prompts]
    reused = [Reuse(f"e{i}", min(h, len(p) - 1)) if min(h, len(p) - 1) > 0 else None
              for i, (h, p) in enumerate(zip(had, prompts))]
    live = {f"r{k}": [5] * 40 + tokens for k, tokens in enumerate(running)}
    shares, choice = plan_sharing(prompts, reused, live, trimmable=trimmable, key="s", min_gain=min_gain)
    by_key = {share.entry: share for share in shares}
    assert len(by_key) == len(shares)
    for prompt, before, after in zip(prompts, reused, choice):
        if after is None:
            continue
        share = by_key[after.entry]
        assert after.tokens <= _lcp(list(share.tokens), prompt) and after.tokens <= len(prompt) - 1
        assert after.tokens - (before.tokens if before else 0) >= (min_gain if share.source else 1)
        assert trimmable or after.tokens == len(share.tokens)
    for share in shares:
        members = [(p, b, a) for p, b, a in zip(prompts, reused, choice) if a is not None and a.entry == share.entry]
        assert members
        if share.source is not None:
            assert list(share.tokens) == live[share.source]
            continue
        spared = sum(a.tokens - (b.tokens if b else 0) for _, b, a in members)
        assert spared - (len(share.tokens) - (share.base.tokens if share.base else 0)) >= min_gain
        if share.base is not None:  # a prefix a request of the same cluster took from the cache, maybe cut
            assert any(b is not None and b.entry == share.base.entry and b.tokens >= share.base.tokens
                       and _lcp(prompts[i], list(share.tokens)) >= share.base.tokens for i, b in enumerate(reused))
            assert share.base.tokens <= len(share.tokens)


def _engine_answers(arrivals: list[list[list[int]]], max_tokens: int, share: bool) -> tuple[list[list[int]], Any]:
    """Run a one-process engine over ``arrivals`` (the prompts that arrive before each step, in order);
    every request's greedy tokens, by arrival, and the engine."""
    import mlxdist
    from mlxdist.lm.testing import random_model
    from mlxdist.serve import engine as engine_module
    from mlxdist.serve import prompt_cache as cache_module

    model, _ = random_model("llama", seed=3, **DIMS)
    engine = engine_module.Engine(model, mlxdist.init(), {}, link=None, max_concurrent=8, eos_ids=[],
                                  vocab_size=DIMS["vocab_size"], timeout=None)
    engine.index = CacheIndex(1 << 30)  # rank 0's index (an engine with no link is not rank 0's front)
    engine.trimmable = True
    tokens: dict[str, list[int]] = {}

    def decode() -> None:
        for event in engine._decode():
            tokens.setdefault(event[0], []).append(event[1])
    fields = {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
              "repetition_penalty": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": 0,
              "logit_bias": {}, "logprobs": -1}
    names = []
    gain = cache_module.MIN_SHARED_GAIN if share else 10**9
    original = engine_module.plan_sharing
    engine_module.plan_sharing = lambda *a, **k: original(*a, **{**k, "min_gain": gain})
    try:
        for step, prompts in enumerate(arrivals):
            for prompt in prompts:
                names.append(f"r{len(names)}")
                engine.inbox.put({"type": "submit", "id": names[-1], "prompt": prompt, **fields})
            work = engine._collect()
            engine._share(work["share"])
            for request in work["submit"]:
                engine._submit(request)
            engine.step += 1
            decode()
        while engine.uid_of:
            decode()
    finally:
        engine_module.plan_sharing = original
        engine.generator.close()
    return [tokens[name] for name in names], engine


def test_a_shared_prefix_prefilled_once_or_copied_from_a_running_request_gives_the_same_tokens():
    """One process, steps driven by hand: two requests arriving while a third with the same 90-token stem
    decodes copy its cache out; two arriving together with another stem share one prefill of it; every
    request's greedy tokens are those it gets with no sharing."""
    rng = np.random.default_rng(5)
    stems = [rng.integers(3, DIMS["vocab_size"], 90).tolist() for _ in range(2)]
    a, b = ([stem + rng.integers(3, DIMS["vocab_size"], 5 + k).tolist() for k in range(3)] for stem in stems)
    arrivals = [[a[0]], [], a[1:], [b[0], b[1]]]
    alone, _ = _engine_answers(arrivals, 8, share=False)
    shared, engine = _engine_answers(arrivals, 8, share=True)
    assert shared == alone
    assert engine.counters["shared_prefixes"] == 2  # a copy of the first request's cache, then a prefill
    assert engine.counters["shared_prefill_tokens"] == 90  # only the second stem was computed for sharing
    assert engine.counters["cached_tokens"] >= 90 * 4


@pytest.mark.parametrize(("family", "stays"), [("llama", True), ("deepseek_v32", True), ("gemma3", False),
                                               ("gpt_oss", False), ("qwen3_5", False)])
def test_shared_prefixes_are_cut_only_for_caches_that_stay_trimmable(family, stays):
    """A local-window layer's cache stops being trimmable once it wraps, and a recurrent one never is; a
    fresh one of each still says it can be cut, so the plan asks the cache types."""
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    from mlxdist.lm.testing import random_model
    from mlxdist.serve.prompt_cache import always_trimmable

    model, _ = random_model(family)
    cache = make_prompt_cache(model)
    assert always_trimmable(cache) is stays
    if family in ("gemma3", "gpt_oss"):
        assert can_trim_prompt_cache(cache)  # until it wraps


def test_a_taken_cache_is_cut_to_the_prefix_and_the_entry_stays_whole():
    from mlx_lm.models.cache import KVCache

    keys = mx.random.normal((1, 2, 10, 4))
    layers = []
    for _ in range(3):
        layer = KVCache()
        layer.update_and_fetch(keys, keys + 1)
        layers.append(layer)
    store = CacheStore()
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)  # mlx-lm allocates in steps
    assert store.put("e", layers, 10) == held == store.nbytes > 0
    taken = store.take(Reuse("e", 6))
    assert [c.offset for c in taken] == [6, 6, 6] and [c.offset for c in layers] == [10, 10, 10]
    k, v = taken[0].update_and_fetch(mx.zeros((1, 2, 1, 4)), mx.zeros((1, 2, 1, 4)))
    assert np.array_equal(np.array(k[..., :6, :]), np.array(keys[..., :6, :])) and k.shape[2] == 7
    assert np.array_equal(np.array(layers[1].keys[..., :10, :]), np.array(keys))
    with pytest.raises(InvalidArgumentError):
        store.take(Reuse("e", 11))
    with pytest.raises(InvalidArgumentError):
        store.take(Reuse("nothing", 1))
    store.drop(["e", "nothing"])
    assert store.entries == {} and store.nbytes == 0


def test_the_bound_option_takes_sizes_and_refuses_bad_ones(capsys):
    from mlxdist.serve.options import parse_options as parse

    assert parse(["--model", "m", "--prompt-cache-bytes", "64M"]).prompt_cache_bytes == 64 << 20
    assert parse(["--model", "m", "--prompt-cache-bytes", "0"]).prompt_cache_bytes == 0
    assert parse(["--model", "m"]).prompt_cache_bytes == 1 << 30
    for bad in ("-1", "lots", "nanG"):
        with pytest.raises(SystemExit) as stop:
            parse(["--model", "m", "--prompt-cache-bytes", bad])
        assert stop.value.code == 2
    assert "--prompt-cache-bytes" in capsys.readouterr().err


# -- served conversations, 2 ranks ----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = write_checkpoint(tmp_path_factory.mktemp("cache") / NAME, family="llama", dtype="float32", **DIMS)
    return add_chat_template(path)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """``generate(prompt_ids, max_tokens) -> tokens``: greedy, one process, no cache; and the tokenizer."""
    from mlx_lm.utils import load_model, load_tokenizer

    from mlxdist.lm.generation import generate_tokens

    model, config = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint, eos_token_ids=config.get("eos_token_id"))

    def generate(prompt: list[int], max_tokens: int) -> list[int]:
        return generate_tokens(model, prompt, max_tokens, stop_tokens=tokenizer.eos_token_ids).tokens

    generate.tokenizer = tokenizer  # type: ignore[attr-defined]
    return generate


class Served(ServeProcess):
    """A 2-rank server and what it was sent: every sequence its ranks may hold a cache of."""

    def __init__(self, checkpoint: Path, backend: str, log: Path, *extra: str) -> None:
        super().__init__(checkpoint, backend, log, 2, *extra)
        self.sequences: list[list[int]] = []
        self.exact = "--prompt-cache-bytes" not in extra  # nothing is evicted under the default bound

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def best(self, prompt: list[int]) -> int:
        """The most prompt tokens any earlier sequence can give (the last token is always computed)."""
        return max([min(_lcp(s, prompt), len(prompt) - 1) for s in self.sequences], default=0)


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, checkpoint, tmp_path_factory) -> Iterator[Served]:
    backend, extra = SERVERS[request.param]
    log = tmp_path_factory.mktemp(f"cache-{request.param}") / "server.log"
    started = Served(checkpoint, backend, log, "--timeout", "60", *extra)
    try:
        started.wait_for(2, 120)
        yield started
    finally:
        started.close()


def _chat(server: Served, reference: Any, messages: list[dict[str, str]], max_tokens: int,
          stream: bool = False) -> tuple[str, int, list[int], list[int]]:
    """One greedy chat turn, checked against one process; (text, cached tokens, prompt ids, reply ids)."""
    tokenizer = reference.tokenizer
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    expected = reference(prompt, max_tokens)
    client = server.client()
    if stream:
        chunks = client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        pieces, usage = [], None
        for chunk in chunks:
            usage = chunk.usage or usage
            pieces += [choice.delta.content or "" for choice in chunk.choices]
        text = "".join(pieces)
    else:
        answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0)
        text, usage = answer.choices[0].message.content, answer.usage
    body = expected[:-1] if expected[-1] in tokenizer.eos_token_ids else expected
    assert text == tokenizer.decode(body)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(expected))
    return text, usage.prompt_tokens_details.cached_tokens, prompt, expected


def _rank_stats(server: Served) -> list[dict[str, Any]]:
    answer = httpx.get(server.url + "/stats", timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["ranks"]


def _hits(server: Served) -> tuple[int, int]:
    stats = _rank_stats(server)[0]
    return stats["prompt_cache_hits"], stats["cached_tokens"]


@pytest.mark.timeout(240)
def test_a_multi_turn_chat_reuses_its_history_and_answers_as_one_process(server, reference):
    hits0, cached0 = _hits(server)
    messages = [{"role": "system", "content": "you answer questions about sharded serving, briefly " * 2}]
    seen = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"question {turn}: what does rank {turn % 2} hold?"})
        text, cached, prompt, reply = _chat(server, reference, messages, 6, stream=turn == 3)
        own = _lcp(server.sequences[-1], prompt) if turn else 0
        best = server.best(prompt)
        # At least the conversation's own last turn (the most recently used entry), at most the best of all.
        assert min(own, len(prompt) - 1) <= cached <= best
        if server.exact:
            assert cached == best
        if turn:
            assert cached > 0
        seen.append(cached)
        server.sequences.append(prompt + reply)
        messages.append({"role": "assistant", "content": text})

    # A completion of token ids continuing the last turn reuses all of it.
    tokenizer = reference.tokenizer
    prompt = server.sequences[-1] + list(tokenizer.encode(" and then", add_special_tokens=False))
    expected = reference(prompt, 6)
    answer = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
    body = expected[:-1] if expected[-1] in tokenizer.eos_token_ids else expected
    assert answer.choices[0].text == tokenizer.decode(body)
    assert answer.usage.prompt_tokens_details.cached_tokens == len(server.sequences[-1])
    server.sequences.append(prompt + expected)
    seen.append(len(server.sequences[-2]))

    hits, cached = _hits(server)
    assert (hits - hits0, cached - cached0) == (sum(c > 0 for c in seen), sum(seen))


def _ask_together(server: Served, reference: Any, system: dict[str, str], questions: list[str],
                  max_tokens: int) -> list[tuple[str, int, list[int], list[int]]]:
    """Each question in a chat of its own after ``system``, sent at once from a thread each; :func:`_chat`'s
    results in the questions' order."""
    results: list[Any] = [None] * len(questions)
    start = threading.Barrier(len(questions))

    def ask(k: int) -> None:
        start.wait(30)
        try:
            results[k] = _chat(server, reference, [system, {"role": "user", "content": questions[k]}], max_tokens)
        except BaseException as exc:  # reported below, with the others
            results[k] = exc

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    assert all(isinstance(result, tuple) for result in results), results
    return results


@pytest.mark.timeout(240)
def test_concurrent_requests_sharing_a_prefix_each_start_from_it(server, reference):
    system = {"role": "system", "content": "every user shares this long system prompt about caches " * 3}
    _, _, prompt, reply = _chat(server, reference, [system, {"role": "user", "content": "warm up"}], 4)
    server.sequences.append(prompt + reply)
    shared = _lcp(prompt, list(reference.tokenizer.apply_chat_template(
        [system, {"role": "user", "content": "zzz"}], add_generation_prompt=True, tokenize=True)))
    questions = [f"user {k} asks about item {k * 7}" for k in range(3)]
    for result in _ask_together(server, reference, system, questions, 6):
        _, cached, prompt, reply = result
        # The shared system prompt at least; at most what the warm-up or any other answer holds.
        assert shared <= cached
        server.sequences.append(prompt + reply)
        assert cached <= server.best(prompt)


@pytest.mark.timeout(240)
def test_requests_sharing_a_prefix_no_entry_holds_prefill_it_once(server, reference):
    """Five users ask at once about a long system prompt the server has not seen: the ranks prefill (or copy
    out of a running request) the shared prefix once, every user but the first to arrive starts from it, and
    every answer is one process's."""
    tokenizer = reference.tokenizer
    system = {"role": "system", "content": "a fresh system prompt about pipeline stages and their caches " * 4}
    questions = [f"user {k} wants stage {k * 3} explained" for k in range(5)]
    prompts = [list(tokenizer.apply_chat_template([system, {"role": "user", "content": q}],
                                                  add_generation_prompt=True, tokenize=True)) for q in questions]
    shared = min(_lcp(a, b) for a in prompts for b in prompts if a is not b)
    assert shared - max(server.best(p) for p in prompts) >= 64  # the cache holds none of it yet
    before = _rank_stats(server)
    results = _ask_together(server, reference, system, questions, 24)
    cached = sorted(result[1] for result in results)
    assert all(c >= shared for c in cached[1:]), (cached, shared)
    for _, c, prompt, reply in results:
        # No more than the prompt shares with what the server held or was being asked at the same time.
        assert c <= max(server.best(prompt), *(min(_lcp(prompt, p), len(prompt) - 1) for p in prompts if p != prompt))
    for result in results:
        server.sequences.append(result[2] + result[3])
    after = _rank_stats(server)
    made = [a["shared_prefixes"] - b["shared_prefixes"] for a, b in zip(after, before)]
    assert made[0] >= 1 and len(set(made)) == 1, made  # every rank made the same entries
    assert len({a["shared_prefill_tokens"] - b["shared_prefill_tokens"] for a, b in zip(after, before)}) == 1


def _metric(server: Served, name: str) -> float:
    answer = httpx.get(server.url + "/metrics", timeout=60)
    assert answer.status_code == 200, answer.text
    (value,) = [float(line.split()[-1]) for line in answer.text.splitlines() if line.startswith(name + " ")]
    return value


@pytest.mark.timeout(240)
def test_n_choices_each_reuse_the_cache_and_metrics_count_every_hit(server, reference):
    """Each of ``n`` choices starts from the cache on its own; /metrics counts what the ranks counted."""
    tokenizer = reference.tokenizer
    prompt = server.sequences[-1] + list(tokenizer.encode(" so then", add_special_tokens=False))
    best = server.best(prompt)
    expected = reference(prompt, 5)
    hits0, cached0 = _hits(server)
    answer = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, n=2)
    body = expected[:-1] if expected[-1] in tokenizer.eos_token_ids else expected
    assert [choice.text for choice in answer.choices] == [tokenizer.decode(body)] * 2
    cached = answer.usage.prompt_tokens_details.cached_tokens
    assert answer.usage.completion_tokens == 2 * len(expected)
    assert 0 < cached <= best
    if server.exact:
        assert cached == best
    hits, cached_total = _hits(server)
    assert hits - hits0 == 2 and cached_total - cached0 >= 2 * cached
    server.sequences.append(prompt + expected)
    # The front door's counter (the ranks' `cached` messages) and rank 0's own agree over the server's life.
    assert _metric(server, "mlxdist_prompt_cache_hits_total") == hits


@pytest.mark.timeout(240)
@pytest.mark.parametrize("server", ["ring-tp"], indirect=True)  # the MPI server's small bound holds no long stream
def test_a_cancelled_request_leaves_its_cache_to_a_retry_and_a_continuation(server, reference):
    """A stream its client leaves is cancelled on every rank at the same step, and its cache is kept under
    the tokens it holds: the prompt and the tokens made until then (``last_cancel``'s count)."""
    tokenizer = reference.tokenizer
    prompt = list(tokenizer.encode("a client that goes away before its answer ends", add_special_tokens=False))
    body = {"model": NAME, "prompt": prompt, "max_tokens": LONGEST, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        rid = json.loads(next(line for line in lines if line.startswith("data:"))[5:])["id"].removeprefix("cmpl-")
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 30
    stats = _rank_stats(server)
    while {rank["last_cancel"].get("id") for rank in stats} != {rid}:
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
        stats = _rank_stats(server)
    (made,) = {rank["last_cancel"]["tokens"] for rank in stats}
    assert 0 < made < LONGEST
    held = prompt + reference(prompt, made)
    assert len(held) == len(prompt) + made and not set(held[len(prompt):]) & set(tokenizer.eos_token_ids)
    server.sequences.append(held)

    def complete(tokens: list[int]) -> int:
        expected = reference(tokens, 6)
        answer = server.client().completions.create(model=NAME, prompt=tokens, max_tokens=6, temperature=0)
        body = expected[:-1] if expected[-1] in tokenizer.eos_token_ids else expected
        assert answer.choices[0].text == tokenizer.decode(body)
        server.sequences.append(tokens + expected)
        return answer.usage.prompt_tokens_details.cached_tokens

    # The same prompt again: all of it but the last token comes from the cancelled request's cache.
    assert complete(prompt) == len(prompt) - 1
    # Continuing from where it was cancelled: every token it held is reused.
    more = held + list(tokenizer.encode(" and then", add_special_tokens=False))
    best = server.best(more)
    assert len(held) <= complete(more) <= best


@pytest.mark.timeout(120)
def test_every_rank_holds_the_same_entries_within_the_bound(server):
    stats = _rank_stats(server)
    entries = {rank["prompt_cache_entries"] for rank in stats}
    assert len(entries) == 1 and entries.pop() > 0
    bound = SMALL_BOUND if not server.exact else 1 << 30
    assert all(0 < rank["prompt_cache_bytes"] <= bound for rank in stats)
    if not server.exact:  # the small bound evicted (the larger shard's size counts)
        assert len(server.sequences) > stats[0]["prompt_cache_entries"]
    assert {rank["prompt_cache_hits"] for rank in stats} == {stats[0]["prompt_cache_hits"]}
