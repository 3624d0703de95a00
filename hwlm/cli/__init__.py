"""The ``hwlm`` command: ``devices``, ``generate``, ``serve``, ``chat`` and ``bench``."""
