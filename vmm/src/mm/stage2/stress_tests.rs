//! Stress tests (being written).
