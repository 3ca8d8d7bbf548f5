//! Engine tests: every rule, normalisation through the key, boundaries, learn mode, properties.
