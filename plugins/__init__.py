"""In-repo plugins. Each registers in the ``aiwfe.plugins`` entry-point group like a third-party one."""
