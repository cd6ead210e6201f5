"""fedtune outside the Flower app: the command line and the deployment runtime (fedtune/runtime/)."""

from common import __version__

__all__ = ["__version__"]
