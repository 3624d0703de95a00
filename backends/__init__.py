"""Backends shipped with hwlm (installed as ``hwlm.backends``)."""
