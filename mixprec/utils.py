"""Helpers for plugin authors: everything a mode needs besides the interface.

Plugins (first- and third-party) call these instead of keeping copies::

    from mixprec.utils import cast_floating, device_of, match_module, parse_dtype

- dtypes: :func:`parse_dtype` (an option's ``"bf16"``/``"fp16"``/… or a torch dtype,
  checked), :func:`dtype_name` (the plain name checkpoints store),
  :func:`short_dtype_name` (as in mode names);
- modules: :func:`match_module` (the ``ignore_modules`` rule: dotted names and
  globs, parents included, matched from the end as well: ``"lm_head"`` selects
  peft's ``base_model.model.lm_head``), :func:`unmatched_patterns` (the entries that
  select no module, for the "matches no module" error), :func:`normalize_patterns`,
  :func:`closest_name`,
  :func:`device_of`, :func:`cast_floating`;
- data: :func:`apply_to_float_tensors`, :func:`local_tensor` / :func:`local_tensors`
  (FSDP2 shards);
- contexts: :func:`build_context` (for ``init_context``), :func:`default_dtype`
  (process-wide), :func:`thread_default_dtype` (for ``forward_context``: this thread
  only), :func:`step_in_dtype` (for ``optimizer_step_context``);
- options: :func:`check_bool` (a boolean option takes ``True``/``False`` only: a truthy
  string such as ``"no"`` is refused) and :func:`check_number` (a finite number, an
  integer where asked, in its range; the error names the option and the range), the
  checks the core's own options use;
- warnings: :func:`warn_user` (attributed to the user's line, whatever the depth);
- loss scaling: :class:`ScalerConfig`, the loss-scaler options of a mode that scales
  (``ScalerConfig.option_names()``; ``mixprec.LossScaler(**options)``).

.. versionadded:: 0.2
"""

from __future__ import annotations

from ._dtypes import DTYPES, dtype_name, parse_dtype, short_dtype_name
from ._interface import build_context, default_dtype, step_in_dtype, thread_default_dtype
from ._match import closest_name, match_module, normalize_patterns, unmatched_patterns
from ._options import check_bool, check_number
from ._scaler import ScalerConfig
from ._tensors import apply_to_float_tensors, cast_floating, device_of, local_tensor, local_tensors
from ._warn import warn_user

__all__ = [
    "DTYPES",
    "ScalerConfig",
    "apply_to_float_tensors",
    "build_context",
    "cast_floating",
    "check_bool",
    "check_number",
    "closest_name",
    "default_dtype",
    "device_of",
    "dtype_name",
    "local_tensor",
    "local_tensors",
    "match_module",
    "normalize_patterns",
    "parse_dtype",
    "short_dtype_name",
    "step_in_dtype",
    "thread_default_dtype",
    "unmatched_patterns",
    "warn_user",
]
