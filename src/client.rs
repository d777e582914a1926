//! A client for the vpstag daemon (placeholder: the daemon work fills it in).
