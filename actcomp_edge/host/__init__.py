"""The host tools: the ``actcomp`` CLI (plan, check, monitor, report, fleet, demo) and the
Flower server. They run the board's side as a process and never run on the board."""
