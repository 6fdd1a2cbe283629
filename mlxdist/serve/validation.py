"""OpenAI request bodies -> one checked request; every way a body can be wrong is an :class:`ApiError`.

A body is checked once, here, in one pass (:func:`parse_request`): every
parameter OpenAI defines for chat completions or completions is either
honoured (it lands in :class:`CompletionRequest`) or refused with a 400
naming it, as is any name OpenAI does not define; nothing a client sends
reaches the ranks unchecked. Only the prompt's length is checked after
tokenization (:func:`fit_max_tokens`).
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from mlxdist.serve.api_error import ApiError

__all__ = ["Sampling", "CompletionRequest", "ROLES", "parse_request", "fit_max_tokens", "check_model"]

ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_STOPS = 4
_MAX_BIASES = 300
_MAX_TOP_LOGPROBS = 20
_MAX_COMPLETION_LOGPROBS = 5
_MAX_CHOICES = 8

# Parameters that are honoured (checked below), per endpoint, beside the extensions every endpoint takes.
_SHARED = {"model", "frequency_penalty", "presence_penalty", "logit_bias", "max_tokens", "n", "seed", "stop",
           "stream", "stream_options", "temperature", "top_p", "user", "top_k", "min_p", "repetition_penalty"}
_CHAT = _SHARED | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                   "parallel_tool_calls", "response_format", "chat_template_kwargs", "metadata", "store",
                   "service_tier", "safety_identifier", "modalities", "prompt_cache_key", "prompt_cache_retention"}
_TEXT = _SHARED | {"prompt", "logprobs", "echo", "best_of", "suffix"}
# OpenAI parameters refused unless they hold their default (which changes nothing): name -> allowed values.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "store": (None, False), "suffix": (None, ""),
    "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]), "parallel_tool_calls": (None, True),
    "prompt_cache_retention": (None, "in_memory"),
}
# OpenAI parameters this server does not implement: any value but null is refused.
_REFUSED = {
    "audio": "audio output", "prediction": "predicted outputs", "web_search_options": "web search",
    "functions": "the deprecated 'functions' (send 'tools')", "function_call": "the deprecated 'function_call' "
    "(send 'tool_choice')", "reasoning_effort": "reasoning effort", "verbosity": "verbosity",
    "prompt_cache_options": "prompt cache options", "moderation": "moderation",
}


def _bad(message: str, param: Optional[str], code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


@dataclass(frozen=True)
class Sampling:
    """Checked generation parameters of one request (the link's ``submit`` fields but the prompt).

    ``max_tokens`` is what the client asked for (None: as many as fit) until
    :func:`fit_max_tokens` sets it; ``logprobs`` is -1 for none, else how
    many alternatives each token reports.
    """

    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    logit_bias: dict[str, float] = field(default_factory=dict)
    logprobs: int = -1

    def link_fields(self) -> dict[str, Any]:
        """The engine link's ``submit`` fields these parameters fill."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "seed": self.seed, "logit_bias": dict(self.logit_bias), "logprobs": self.logprobs}


@dataclass(frozen=True)
class CompletionRequest:
    """One checked chat or text completion request.

    Attributes:
        chat: A chat completion (else a text completion).
        sampling: Its generation parameters.
        messages: The chat messages as the chat template takes them (chat).
        prompt: The prompt, text or token ids (text completion).
        tools: The tools offered to the model (None: none), rendered by the chat template.
        template_kwargs: Extra variables for the chat template (``chat_template_kwargs``).
        echo: Prepend the prompt to the text (text completion).
        user: The client's end-user id (written to the access log).
        choices: How many answers to generate (``n``); choice ``i`` draws with seed ``seed + i``.
    """

    chat: bool
    sampling: Sampling
    messages: tuple[dict[str, Any], ...] = ()
    prompt: str | list[int] = ""
    tools: Optional[list[dict[str, Any]]] = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    echo: bool = False
    user: Optional[str] = None
    choices: int = 1


def check_model(body: dict[str, Any], served: tuple[str, ...]) -> None:
    """Raise 404 when ``body["model"]`` names a model this server does not serve (absent is fine)."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    if model not in served:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served[0]!r}",
                       "model_not_found", "model")


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, *,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise _bad(f"'{name}' must be a number", name, "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bound = "(" if low_open else "["
        raise _bad(f"'{name}' must be in {bound}{low:g}, {high:g}], got {value}", name)
    return float(value)


def _logit_bias(body: dict[str, Any], vocab_size: int) -> dict[str, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > _MAX_BIASES:
        raise _bad(f"'logit_bias' must be an object of at most {_MAX_BIASES} token ids", "logit_bias", "invalid_type")
    checked = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
            raise _bad(f"'logit_bias' keys must be token ids below {vocab_size}, got {key!r}", "logit_bias")
        if not _is_number(value) or not -100 <= value <= 100:
            raise _bad(f"'logit_bias' values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        checked[str(int(key))] = float(value)
    return checked


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= _MAX_STOPS):
        raise _bad(f"'stop' must be a string or a list of at most {_MAX_STOPS} strings", "stop", "invalid_type")
    return tuple(s for s in stop if s)


def _logprobs(body: dict[str, Any], chat: bool) -> int:
    value, top = body.get("logprobs"), body.get("top_logprobs")
    if not chat:
        if value is None:
            return -1
        if not _is_int(value) or not 0 <= value <= _MAX_COMPLETION_LOGPROBS:
            raise _bad(f"'logprobs' must be an integer in [0, {_MAX_COMPLETION_LOGPROBS}]", "logprobs")
        return int(value)
    if value is not None and not isinstance(value, bool):
        raise _bad("'logprobs' must be a boolean", "logprobs", "invalid_type")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= _MAX_TOP_LOGPROBS:
            raise _bad(f"'top_logprobs' must be an integer in [0, {_MAX_TOP_LOGPROBS}]", "top_logprobs")
        if not value:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return int(top or 0) if value else -1


def _sampling(body: dict[str, Any], chat: bool, vocab_size: int) -> Sampling:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested = body.get(name)
    if requested is not None:
        if not _is_int(requested):
            raise _bad(f"'{name}' must be an integer", name, "invalid_type")
        if requested < 1:
            raise _bad(f"'{name}' must be at least 1, got {requested}", name)
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(31)
    elif not _is_int(seed):
        raise _bad("'seed' must be an integer", "seed", "invalid_type")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise _bad("'top_k' must be an integer >= 0 (0 or -1: off)", "top_k")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not (isinstance(options, dict) and set(options) <= {"include_usage", "include_obfuscation"}
            and isinstance(options.get("include_usage", False), bool)):
        raise _bad("'stream_options' must be an object with a boolean 'include_usage'", "stream_options",
                   "invalid_type")
    if options.get("include_obfuscation"):
        raise _bad("'stream_options.include_obfuscation' is not supported", "stream_options")
    return Sampling(
        max_tokens=requested,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0 if chat else 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(0, int(top_k or 0)),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 0.0, 10.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=int(seed) % (2**63),
        stop=_stops(body),
        stream=bool(stream),
        include_usage=bool(options.get("include_usage", False)),
        logit_bias=_logit_bias(body, vocab_size),
        logprobs=_logprobs(body, chat),
    )


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"{where}.content parts must be {{'type': 'text', 'text': str}}", "messages",
                           "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise _bad(f"{where}.content must be a string or a list of text parts", "messages", "invalid_type")


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, arguments decoded (chat templates take them as objects)."""
    if not isinstance(calls, list):
        raise _bad(f"{where}.tool_calls must be a list", "messages", "invalid_type")
    checked = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments", "{}"), str)):
            raise _bad(f"{where}.tool_calls[{j}] must be {{'id', 'type': 'function', 'function': {{'name': str, "
                       "'arguments': JSON text}}}}", "messages", "invalid_type")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError:
            raise _bad(f"{where}.tool_calls[{j}].function.arguments is not JSON", "messages") from None
        checked.append({"id": str(call.get("id", "")), "type": "function",
                        "function": {"name": function["name"], "arguments": arguments}})
    return checked


def _messages(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list of message objects", "messages", "invalid_type")
    if not messages:
        raise _bad("'messages' must hold at least one message", "messages")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object", "messages", "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {list(ROLES)}, got {role!r}", "messages")
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                 "content": _content_text(message.get("content"), where)}
        if role == "assistant" and message.get("tool_calls") is not None:
            entry["tool_calls"] = _tool_calls(message["tool_calls"], where)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _bad(f"{where}.tool_call_id must be a string", "messages", "invalid_type")
            entry["tool_call_id"] = call_id
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        checked.append(entry)
    return tuple(checked)


def _tools(body: dict[str, Any]) -> Optional[list[dict[str, Any]]]:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools):
            raise _bad("'tools' must be a list of {'type': 'function', 'function': {'name': str, ...}}", "tools",
                       "invalid_type")
    if choice is None or choice == "auto":
        return tools or None
    if choice == "none":
        return None
    raise _bad("'tool_choice' must be 'auto' or 'none' (the model cannot be forced to call a tool)",
               "tool_choice")


def _response_format(body: dict[str, Any]) -> None:
    value = body.get("response_format")
    if value is None or (isinstance(value, dict) and value.get("type") == "text"):
        return
    kind = value.get("type") if isinstance(value, dict) else value
    raise _bad(f"'response_format' {kind!r} is not supported (only 'text': this server does not constrain "
               "decoding to JSON)", "response_format")


def _template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    value = body.get("chat_template_kwargs")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _bad("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
    reserved = {"messages", "tools", "add_generation_prompt", "tokenize"} & set(value)
    if reserved:
        raise _bad(f"'chat_template_kwargs' may not set {sorted(reserved)}", "chat_template_kwargs")
    return dict(value)


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' must not be empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(t < 0 for t in prompt):
            raise _bad("'prompt' token ids must be >= 0", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("one prompt per request: send several requests (they are batched together)", "prompt")
    raise _bad("'prompt' must be a non-empty string or list of token ids", "prompt", "invalid_type")


def _known(body: dict[str, Any], chat: bool) -> None:
    """Refuse what is not honoured: names this endpoint does not take, and values only the default may have."""
    allowed = _CHAT if chat else _TEXT
    for name, value in body.items():
        if name in _REFUSED and value is not None:
            raise _bad(f"'{name}' is not supported: this server does not implement {_REFUSED[name]}", name,
                       "unsupported_parameter")
        if name not in allowed and name not in _REFUSED:
            raise _bad(f"unrecognized request argument '{name}'", name, "unknown_parameter")
        if name in _DEFAULT_ONLY and value not in _DEFAULT_ONLY[name]:
            shown = [v for v in _DEFAULT_ONLY[name] if v is not None]
            raise _bad(f"'{name}' must be {' or '.join(map(repr, shown))} on this server, got {value!r}", name,
                       "unsupported_parameter")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise _bad("'metadata' must be an object", "metadata", "invalid_type")
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise _bad(f"'{name}' must be a string", name, "invalid_type")
    if not chat and body.get("echo") is not None and not isinstance(body["echo"], bool):
        raise _bad("'echo' must be a boolean", "echo", "invalid_type")
    if not chat and body.get("echo") and body.get("logprobs") is not None:
        raise _bad("'echo' with 'logprobs' is not supported (prompt logprobs are not computed)", "echo",
                   "unsupported_parameter")


def parse_request(body: dict[str, Any], *, chat: bool, served: tuple[str, ...], vocab_size: int) -> CompletionRequest:
    """Check a chat or text completion body, every parameter in one pass.

    Args:
        body: The decoded JSON object.
        chat: A chat completion body (else a text completion one).
        served: The names the ``model`` field may give.
        vocab_size: Token ids (prompt ids, ``logit_bias`` keys) must be below it.

    Returns:
        The checked request (``sampling.max_tokens`` as asked; see :func:`fit_max_tokens`).

    Raises:
        ApiError: 400 naming the parameter for a wrong type or value, a parameter
            this server does not honour, or a name OpenAI does not define; 404 for
            a model this server does not serve.
    """
    _known(body, chat)
    check_model(body, served)
    sampling = _sampling(body, chat, vocab_size)
    user = body.get("user") or body.get("safety_identifier")
    choices = body.get("n")
    if choices is None:
        choices = 1
    elif not _is_int(choices) or not 1 <= choices <= _MAX_CHOICES:
        raise _bad(f"'n' must be an integer in [1, {_MAX_CHOICES}]", "n")
    if not chat:
        prompt = _prompt(body)
        if isinstance(prompt, list) and any(t >= vocab_size for t in prompt):
            raise _bad(f"'prompt' token ids must be below the vocabulary size {vocab_size}", "prompt")
        return CompletionRequest(chat=False, sampling=sampling, prompt=prompt, echo=bool(body.get("echo")),
                                 user=user, choices=choices)
    _response_format(body)
    return CompletionRequest(chat=True, sampling=sampling, messages=_messages(body), tools=_tools(body),
                             template_kwargs=_template_kwargs(body), user=user, choices=choices)


def fit_max_tokens(request: CompletionRequest, prompt_tokens: int, *, context: int, cap: int) -> Sampling:
    """The request's sampling with ``max_tokens`` fitted to the context and the server's cap.

    Args:
        request: The checked request.
        prompt_tokens: Length of its tokenized prompt.
        context: The model's context length (prompt plus generated tokens).
        cap: The server's ``--max-tokens``: larger requests are cut to it.

    Returns:
        The sampling; ``max_tokens`` defaults to what fits, at most ``cap``.

    Raises:
        ApiError: 400 ``context_length_exceeded`` when the prompt (plus the tokens asked for) exceeds the context.
    """
    requested = request.sampling.max_tokens
    if prompt_tokens >= context or (requested is not None and prompt_tokens + requested > context):
        raise _bad(f"this model's context is {context} tokens; the prompt has {prompt_tokens} and "
                   f"{requested if requested is not None else 'at least 1'} more were requested",
                   "messages" if request.chat else "prompt", "context_length_exceeded")
    return replace(request.sampling, max_tokens=min(cap, context - prompt_tokens,
                                                    requested if requested is not None else cap))
