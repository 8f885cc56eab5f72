"""The model schema (ModelConfig) and the one place that maps it onto the network constructors."""
