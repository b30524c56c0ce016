"""The pure core: what kvmagent decides, as plain data for others to carry
out.  A checked guest's QEMU command line (qemu), the plan the supervisor
carries out (plan), the systemd settings of its service and scope (service,
scope) and their D-Bus form (unitprops), the effective configuration as
TOML (show); what clone makes (cloneplan), the host kernel a guest gets
(hostkernel), the machine type it is pinned to (pin); a guest's uptime and
restarts from its recorded events (uptime); live migration's decisions
(migration, transport, storagecopy) and Pacemaker's resource agent's (ocf).
Pure: no file, process or socket is touched here."""
