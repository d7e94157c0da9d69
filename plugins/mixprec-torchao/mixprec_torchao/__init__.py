"""mixprec-torchao: torchao FP8 training and low-bit AdamW as mixprec modes.

    model, opt = mixprec.wrap(model, opt, mode="fp8-rowwise+ao-adamw8bit")

Modes: ``fp8-tensorwise``, ``fp8-rowwise``, ``fp8-rowwise-gw-hp`` (precision) and
``ao-adamw8bit``, ``ao-adamw4bit``, ``ao-adamw-fp8`` (optimizer). Importing this
package does not import torchao; building a mode does.
"""

from ._fp8 import RECIPES, Float8Training
from ._optim import LowBitAdamW, state_bytes

__version__ = "0.1.0"

__all__ = ["RECIPES", "Float8Training", "LowBitAdamW", "__version__", "state_bytes"]
