"""actcomp-edge: ``core`` is what the board and the exporter share (numpy only); ``host`` is
the ``actcomp`` CLI and the tools that run beside a board."""
__version__ = "0.1.0"
