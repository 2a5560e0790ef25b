"""fastvit: placeholder, being written."""
