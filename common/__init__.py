"""Code both sides run: config, data, model, adapter, records, secure aggregation. With client/ and server/,
the FAB (the app bundle Flower runs); the deployment runtime outside it lives in fedtune/runtime/."""

import logging

__version__ = "0.1.0"
"""fedtune's version: sites refuse a run whose FAB carries another (fedtune.runtime.executor)."""

# bitsandbytes (QLoRA) hints at a "kernels" package on import, which would fetch code from a model hub: never here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
