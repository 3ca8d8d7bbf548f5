//! Configuration parsing and validation tests.
