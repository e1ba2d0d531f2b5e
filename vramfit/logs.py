"""Start-up quiet: by default only vramfit's own lines reach stdout/stderr; ``vramfit -v`` lets the libraries speak.

Everything the libraries say at import or load time goes through Python's logging or warnings (read from their
sources: torchao's "Failed to load ..._C_mxfp8", bitsandbytes' "kernels-community", transformers' "requires
torchvision", diffusers' "Unable to import `torchao` Tensor objects", torch's pytree notices, torchao's
SyntaxWarning): so logging levels and a warnings filter, set here once before any of them is imported, are
enough. torch, transformers and diffusers reset their own root logger's level from an environment variable when they
first log, so for those three the variable is the setting that holds.
"""

from __future__ import annotations

import logging
import os
import warnings

# loggers of the libraries vramfit drives; their children (e.g. torch.utils._pytree) inherit the level
LIBRARIES = ("torch", "torchao", "bitsandbytes", "transformers", "diffusers", "accelerate", "optimum", "gguf",
             "huggingface_hub", "safetensors", "tokenizers", "urllib3", "PIL", "triton")
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # also stops tokenizers' fork warning
    # torch sets its own root logger back to WARNING at import unless TORCH_LOGS says otherwise ("-torch": ERROR)
    "TORCH_LOGS": "-torch",
}


def configure(verbose: bool = False) -> None:
    """Call once, early in ``main()``, before torch/diffusers/transformers are imported."""
    if verbose:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for name in LIBRARIES:
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.lastResort.setLevel(logging.WARNING)
        warnings.simplefilter("default")
        return
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)  # a user's explicit setting wins
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    # a library logging through an unconfigured logger ends in logging.lastResort (stderr, WARNING and up)
    logging.lastResort.setLevel(logging.ERROR)
    # Python warnings (DeprecationWarning, FutureWarning, UserWarning, SyntaxWarning from compiling a library's
    # source): vramfit itself never warns through this module -- its own notes are printed lines
    warnings.simplefilter("ignore")
    _quiet_libraries_loaded_already()


def _quiet_libraries_loaded_already() -> None:
    """transformers/diffusers imported before configure() (e.g. main() called in-process) keep the level they
    set from the environment at import: set it again through their own API."""
    import sys

    for mod in ("transformers.utils.logging", "diffusers.utils.logging"):
        lib = sys.modules.get(mod)
        if lib is not None:
            lib.set_verbosity_error()
