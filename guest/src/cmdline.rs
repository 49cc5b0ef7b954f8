//! Kernel command line parsing for the PVH boot path (QEMU `-kernel`): placeholder filled in with milestone 2.
