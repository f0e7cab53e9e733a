"""The per-domain OVF store: validated, streamed, atomic tar uploads."""
