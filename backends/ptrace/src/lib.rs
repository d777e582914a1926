//! vpstag backend (ptrace): placeholder, filled in by its own work.
