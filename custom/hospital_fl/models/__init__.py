"""Network factories."""
