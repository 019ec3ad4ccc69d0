//! (being written) USB/IP server front end: exports SimDevices to a kernel's vhci-hcd.
