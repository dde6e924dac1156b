"""An example third-party AIWFE plugin package (see contract.py and plugin.py)."""
