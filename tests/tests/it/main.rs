//! The one integration-test binary: in-process nodes on 127.0.0.1 (mDNS
//! off), the CLI against real nodes, hostile peers, and the namespace LAN
//! lab when run as root.

mod cli;
mod hostile;
mod lab;
mod sync;
