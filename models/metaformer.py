"""metaformer: placeholder, being written."""
