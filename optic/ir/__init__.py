"""The IR: a model as a torch.fx graph, and how a model becomes one.

- :mod:`.graph` : graph helpers every pass uses (constants, provenance, replacement, dead code); this
  package re-exports them, so ``from optic import ir; ir.replace(...)`` reads as before;
- :mod:`.opview` : one view of an op whatever its spelling (module, functional, method, ATen);
- :mod:`.rewrite` : rules (match, guard, apply) and the one driver that walks the graph for them;
- :mod:`.emit` : building the replacement nodes;
- :mod:`.program` : a captured model with what it was captured from;
- :mod:`.capture`, :mod:`.dynamic`, :mod:`.contract` : torch.fx / torch.export capture, dynamic
  dimensions, and the original's call contract.
"""

from .graph import *  # noqa: F403
