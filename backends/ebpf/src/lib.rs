//! vpstag backend (ebpf): placeholder.
