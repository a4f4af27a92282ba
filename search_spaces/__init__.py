"""Bundled search-space files (YAML), found by name: `autoglm-tune --space batch_quant`."""
