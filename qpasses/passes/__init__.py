"""Graph passes, one per module, each named after the pass it holds."""
