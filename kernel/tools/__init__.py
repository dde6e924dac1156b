"""Tooling built on the kernel: the ``aiwfe`` command line, ``aiwfe up`` with its embedded
development servers, Kubernetes rendering and ``aiwfe publish``/``dlq``.

Nothing in the kernel core imports this package; it imports the kernel.
"""
