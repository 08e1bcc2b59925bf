"""noprop.client: see DESIGN.md."""
