"""Code both sides run: config, data, model, adapter, records, secure aggregation. With client/ and server/,
the FAB (the app bundle Flower runs); the deployment runtime outside it lives in fedtune/runtime/."""

__version__ = "0.1.0"
"""fedtune's version: sites refuse a run whose FAB carries another (fedtune.runtime.executor)."""
