//! The integration-test binary of in-process nodes on 127.0.0.1 (mDNS
//! off): multi-node sync and hostile peers. The CLI's end-to-end tests and
//! the namespace LAN lab live with the binary they run, in `cli/tests/`.

mod api;
mod apps;
mod dashboard;
mod events;
mod folders;
mod history;
mod hostile;
mod hostile_folders;
mod limits;
mod model;
mod pairing;
mod relay;
mod supervise;
mod sync;
