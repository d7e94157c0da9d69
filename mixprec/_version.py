__version__ = "0.2.0"

#: Version of the plugin interface (hookspecs, ModeSpec, PrecisionMode,
#: OptimizerMode). A mode whose ``ModeSpec.api_version`` is higher than this is
#: reported as incompatible instead of being loaded.
PLUGIN_API_VERSION = 2
