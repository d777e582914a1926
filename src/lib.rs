//! vpstag
