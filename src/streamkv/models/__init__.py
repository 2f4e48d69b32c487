"""What is measured on: model and text sources (embedded, local, hub) and the weights variants."""
