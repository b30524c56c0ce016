"""Other tools' guest configurations, read for `kvmagent import`: hand-written
kvm start scripts (kvmscript, with shellwords, the shell subset read without
running it, and kvmoptions, their QEMU options) and Xen xm/xl domain files
(xenconfig, read by xenparse with ast, never run), written as guest TOML
with a comment for each choice (importtoml).  Pure: no file is written here."""
