"""snakepit adapter plugin for Node.js workers.

Provides the ``node`` adapter (the bundled bridge, ``js/bridge.js``) and :func:`node_adapter`
for workers written with the Node bridge library (``require("snakepit")``).
"""

from .plugin import BRIDGE, LIBRARY_DIR, VERSION, node_adapter

__version__ = VERSION

__all__ = ["BRIDGE", "LIBRARY_DIR", "__version__", "node_adapter"]
