//! shared code
