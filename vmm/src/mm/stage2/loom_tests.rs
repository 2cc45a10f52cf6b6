//! Loom models (being written).
