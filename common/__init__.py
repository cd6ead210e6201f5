"""Code both sides run: config, data, model, adapter, records, secure aggregation."""

import logging

# bitsandbytes (QLoRA) hints at a "kernels" package on import, which would fetch code from a model hub: never here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
