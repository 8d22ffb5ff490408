//! The load generator binary.
fn main() {}
