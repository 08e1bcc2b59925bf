"""noprop.proto: see DESIGN.md."""
