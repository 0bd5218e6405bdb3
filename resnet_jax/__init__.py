"""resnet_jax: ResNet (He et al. 2015) in JAX/Flax."""

import os

# Set here, before any submodule can import TensorFlow, which reads them once at its
# import: TensorFlow only prepares and reads data in this project, so its C++ INFO lines
# (and the notice that its oneDNN kernels, used only by its own float math, are on) stay
# off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
