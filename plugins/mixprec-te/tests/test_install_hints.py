"""The core's install hints and this plugin agree: every mode the plugin provides is
the core's first-party hint for it ("pip install mixprec-te"), and every hint that names
mixprec-te is a mode the plugin provides."""

from __future__ import annotations

import mixprec_te.plugin

from mixprec.testing import first_party_modes


def test_the_plugin_provides_exactly_the_modes_the_core_hints_at():
    provided = {spec.name for spec in mixprec_te.plugin.mixprec_modes()}
    assert provided
    assert provided == first_party_modes("mixprec-te")
