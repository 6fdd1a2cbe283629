"""An OpenAI-compatible HTTP server over a model sharded on mlxdist ranks.

The HTTP front door (:mod:`mlxdist.serve.endpoints`, :mod:`mlxdist.serve.broker`)
is separate from the rank-side engine (:mod:`mlxdist.serve.engine`): they
talk over a local link with a fixed JSON-lines schema
(:mod:`mlxdist.serve.protocol`). With ``-n`` the front door lives in the
process that supervises the ranks (:mod:`mlxdist.serve.supervisor`), which
re-forms the world after a rank's loss and resumes the requests in flight on
it (:mod:`mlxdist.serve.resume`). Run it with ``mlxdist-serve --model DIR -n 2``
(see :mod:`mlxdist.serve.cli`).

Requires the ``serve`` extra (``pip install "mlxdist[serve]"``).
"""

try:
    import prometheus_client  # noqa: F401
    import sse_starlette  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("mlxdist.serve needs the serve extra: pip install 'mlxdist[serve]'") from exc

__all__: list[str] = []
