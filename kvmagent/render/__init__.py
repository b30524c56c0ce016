"""Rendering: a checked guest turned into plain data for others to carry
out — QEMU's command line (qemu), the plan the supervisor carries out
(plan), the systemd settings of its service and scope (service, scope) and
their D-Bus form (unitprops), and the effective configuration as TOML
(show).  Pure."""
