"""resnet: placeholder, being written."""
