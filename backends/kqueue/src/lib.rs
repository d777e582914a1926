//! vpstag backend (kqueue): placeholder, filled in by its own work.
