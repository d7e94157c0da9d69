# Opt in to mixprec's conformance kit: its fixtures and the ModeConformance checks.
pytest_plugins = ["mixprec.testing"]
