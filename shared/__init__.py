"""noprop-fl: NoProp training across devices with per-device block ownership.

The core (this package) is what every side shares: schedule, model, trainer, data, checkpoints.
"""

__version__ = "0.1.0"
