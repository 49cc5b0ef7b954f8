//! migrator (to be built).
