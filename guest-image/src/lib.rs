//! Test guest programs and the guest<->VMM protocol.
