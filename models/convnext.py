"""convnext: placeholder, being written."""
