"""Configuration: the guests' and the host's TOML files with their drop-ins
(layers), the value syntaxes (values), every key and its type (schema),
the data they become (model), loaded and checked (guests).  Pure: it reads
files and imports nothing of kvmagent but the shared names."""
