//! The namespace labs, each run as root and skipped elsewhere with a line
//! that says why: the LAN lab (scripts/lab/lan.sh: two `shoal up` processes
//! on a bridge, mDNS on, no --peer) and the NAT lab (scripts/lab/nat.sh: two
//! devices behind two NATs meeting through `shoal relay`).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

fn run_lab(script: &str, what: &str) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new("bash");
    cmd.arg(root.join(script));
    cmd.env("SHOAL_BIN", env!("CARGO_BIN_EXE_shoal"));
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => {
            println!("{stdout}");
            Ok(())
        }
        Some(77) => {
            // Not root, or no netns here: say so and pass.
            eprintln!("skipping the {what}: {}", stdout.trim());
            Ok(())
        }
        _ => bail!(
            "{what} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn lan_lab_mdns_discovery_and_a_change_crossing() -> Result<()> {
    run_lab("scripts/lab/lan.sh", "LAN lab")
}

#[test]
fn nat_lab_devices_behind_two_nats_meet_through_a_relay() -> Result<()> {
    run_lab("scripts/lab/nat.sh", "NAT lab")
}
