//! testbed (to be built).
