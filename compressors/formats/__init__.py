"""How compressed weights are stored: one record class per stored format, the runtime modules
that compute with them, and the artifact folder (save, load, exact size, checksums)."""
