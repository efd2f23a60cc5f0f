"""Silence import-time chatter of optional packages, once, before diffusers is imported.

On a CPU machine xformers and torchao log that their CUDA kernels cannot load, transformers
that torchvision is missing, and diffusers draws a progress bar per component it loads. None of
it is about the user's run; sdbuild prints its own progress. Real errors still surface.
"""

import logging

_NOISY_LOGGERS = ("xformers", "torchao", "torchao.kernel.intmm", "torch.utils._pytree", "transformers")


def quiet_imports() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
