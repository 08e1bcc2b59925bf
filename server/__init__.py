"""noprop.server: see DESIGN.md."""
