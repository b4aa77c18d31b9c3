"""A constrained request's grammar, compiled once for all its choices, away from everyone else's tokens.

Building the grammar (the schema's finiteness check and JSON text: milliseconds of the GIL) and compiling it
(llguidance: a few hundred milliseconds for a big one, with the GIL let go) run on a worker thread of their own,
so neither the event loop, which streams every client's tokens, nor the engine thread, which computes them,
waits. Work is bounded by llguidance's limits (grammar.LIMITS) and the wait by a wall clock; what exceeds either
is a 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ember.runtime.model.grammar import CompiledGrammar, Grammars
from ember.runtime.serving.errors import APIError

# A request's wait for its grammar, queueing for a worker included; a compile within LIMITS takes well under it.
COMPILE_TIMEOUT_S = 5.0

# Two compiles at once at most: each holds a core, and the engine thread needs one for every other request.
_workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ember-grammar")


def _compile(grammars: Grammars, source: Callable[[], str | None]) -> CompiledGrammar | None:
    grammar = source()
    return None if grammar is None else grammars.compile(grammar)


async def compile_grammar(grammars: Grammars, source: Callable[[], str | None], param: str) -> CompiledGrammar | None:
    """The compiled grammar of `source()` (None when it gives none); an APIError naming `param` (the request
    field the grammar comes from) when the grammar cannot be served or does not compile in time."""
    work = asyncio.get_running_loop().run_in_executor(_workers, _compile, grammars, source)
    try:
        return await asyncio.wait_for(work, COMPILE_TIMEOUT_S)
    except TimeoutError:
        # The worker runs on until llguidance's own limits end it; only this request stops waiting.
        raise APIError(400, f"{param}: the schema did not compile within {COMPILE_TIMEOUT_S:g} s", param=param,
                       code="invalid_parameter") from None
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_parameter") from None
    except (TypeError, KeyError, AttributeError, RecursionError):
        # a schema shaped as no draft this server reads (keywords of unexpected types): still the caller's input
        raise APIError(400, f"{param}: the schema cannot be enforced: a keyword has a value of an unexpected type",
                       param=param, code="invalid_parameter") from None
