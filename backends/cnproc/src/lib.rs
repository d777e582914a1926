//! vpstag backend (cnproc): placeholder, filled in by its own work.
