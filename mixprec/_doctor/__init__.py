"""``mixprec doctor``: which precision mode a model can take, and which layers to keep.

One idea per module: ``sqnr`` (the numbers: SQNR, fp16 range, lost updates),
``measure`` (per-layer passes against an fp32 copy), ``train`` (the short training
run), ``recommend`` (flags, fixes, the choice), ``result`` (the report as data),
``report`` (tables, JSON, heatmap), ``cli`` (``mixprec doctor``) and ``run``
(:func:`doctor`, tying them together). ``mixprec.doctor`` is :func:`doctor`.
"""

from __future__ import annotations

from .result import DoctorReport
from .run import doctor

__all__ = ["DoctorReport", "doctor"]
