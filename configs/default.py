"""Base configuration: every key the trainer reads, with its default and meaning.

The keys and their documentation live in resnet_jax/defaults.py; the other files in
configs/ import this one (`from configs import default`) and change only what differs.
"""

from resnet_jax.defaults import get_config

__all__ = ["get_config"]
