"""lorabench: compare LoRA variants (LoRA, QLoRA, QA-LoRA, ReLoRA) and full fine-tuning on one shared backbone."""

import logging

__version__ = "0.1.0"

# bitsandbytes 0.50 warns on every import on CPUs with AVX512-BF16 that the optional `kernels`
# package (a downloaded CPU kernel) is missing; its plain CPU path is the one this harness
# uses and tests, so the warning says nothing actionable. Filtered before any import of it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)
