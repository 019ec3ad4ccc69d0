//! TSS
