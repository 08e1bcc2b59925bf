"""noprop.deploy: see DESIGN.md."""
