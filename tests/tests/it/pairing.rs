//! Invite codes, roles and revocation between real nodes on 127.0.0.1.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use shoal_node::Node;
use shoal_protocol::invite::InviteCode;
use shoal_protocol::{DocId, Role};
use shoal_tests::*;

fn todo() -> DocId {
    "todo".parse().unwrap_or_else(|_| DocId::members())
}

const HOUR: Duration = Duration::from_secs(3600);
const SHORT: Duration = Duration::from_secs(5);

async fn invite(owner: &Node, role: Role) -> Result<String> {
    owner
        .create_invite("notes", role, HOUR, 1)
        .await?
        .code
        .context("no code")
}

/// Re-encodes a code after `f` changed it.
fn tamper(code: &str, f: impl FnOnce(&mut InviteCode)) -> Result<String> {
    let mut c = InviteCode::decode(code)?;
    f(&mut c);
    Ok(c.encode())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_join_and_edit_on_both_sides() -> Result<()> {
    let n = spawn_nodes(2).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    a.put("notes", &todo(), "/items/0", json!("from a")).await?;
    let code = invite(a, Role::Editor).await?;
    // nothing but the code: b was never told a's address
    let info = b.join(&code, SHORT).await?;
    assert_eq!(info.name, "notes");
    wait_converged(&[a, b], "notes", "todo").await?;
    b.put("notes", &todo(), "/items/-", json!("from b")).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    assert_eq!(
        a.get("notes", &todo()).await?,
        json!({"items": ["from a", "from b"]})
    );
    let members = a.members("notes").await?;
    let bm = members
        .iter()
        .find(|m| m.device == b.device_id().to_string())
        .context("b not in members")?;
    assert_eq!(bm.role, Role::Editor);
    assert_eq!(bm.name, "n1");
    // the invite is used up, and says so
    let inv = a.invites("notes").await?;
    assert_eq!(inv[0].state, "used");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_codes_each_get_their_own_clear_error() -> Result<()> {
    let n = spawn_nodes(3).await?;
    let (a, b, c) = (&n[0].node, &n[1].node, &n[2].node);
    a.create_space("notes").await?;
    let code = invite(a, Role::Editor).await?;

    // one-character typo and truncation: caught locally, no traffic
    let mut typo = code.clone().into_bytes();
    let i = typo.len() / 2;
    typo[i] = if typo[i] == b'q' { b'p' } else { b'q' };
    let e = b
        .join(std::str::from_utf8(&typo)?, SHORT)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("typo"), "{e}");
    let e = b
        .join(&code[..code.len() - 7], SHORT)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("typo") || e.contains("incomplete"), "{e}");
    let e = b.join("hello", SHORT).await.unwrap_err().to_string();
    assert!(e.contains("not a shoal invite code"), "{e}");
    // expired: the code says so before any traffic
    let old = tamper(&code, |c| c.expires_at = 1)?;
    let e = b.join(&old, SHORT).await.unwrap_err().to_string();
    assert!(e.contains("expired"), "{e}");
    // a forged secret is refused by the inviter
    let forged = tamper(&code, |c| c.secret.0[0] ^= 1)?;
    let e = b.join(&forged, SHORT).await.unwrap_err().to_string();
    assert!(e.contains("secret"), "{e}");
    // a code pointing at another space gets nothing
    let wrong = tamper(&code, |c| c.space.0[0] ^= 1)?;
    let e = b.join(&wrong, SHORT).await.unwrap_err().to_string();
    assert!(e.contains("another space"), "{e}");
    assert!(
        b.spaces().await?.is_empty(),
        "half-joined space left behind"
    );

    // used: b joins, then c tries the same single-use code
    b.join(&code, SHORT).await?;
    let e = c.join(&code, SHORT).await.unwrap_err().to_string();
    assert!(e.contains("already been used"), "{e}");
    // the same device again is idempotent, not an error
    assert!(b
        .join(&code, SHORT)
        .await
        .unwrap_err()
        .to_string()
        .contains("already in"));

    // cancelled
    let code2 = invite(a, Role::Viewer).await?;
    let id = hex_id(&code2)?;
    a.cancel_invite("notes", &id).await?;
    let e = c.join(&code2, SHORT).await.unwrap_err().to_string();
    assert!(e.contains("cancelled"), "{e}");
    assert!(
        c.spaces().await?.is_empty(),
        "half-joined space left behind"
    );
    // only owners invite
    let e = b
        .create_invite("notes", Role::Editor, HOUR, 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("owner"), "{e}");
    Ok(())
}

fn hex_id(code: &str) -> Result<String> {
    let c = InviteCode::decode(code)?;
    Ok(c.invite.iter().map(|b| format!("{b:02x}")).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inviter_offline_times_out_with_a_clear_error_and_leaves_nothing() -> Result<()> {
    let mut n = spawn_nodes(2).await?;
    n[0].node.create_space("notes").await?;
    let code = invite(&n[0].node, Role::Editor).await?;
    n[0].stop().await;
    let e = n[1]
        .node
        .join(&code, Duration::from_secs(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("did not answer in time"), "{e}");
    assert!(n[1].node.spaces().await?.is_empty());
    // the inviter comes back (new port): the same code still works, found
    // by peer id once the joiner is told a current address
    n[0].start().await?;
    connect(&n[1].node, &n[0].node).await?;
    n[1].node.join(&code, SHORT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_change_and_the_last_owner_stays() -> Result<()> {
    let n = spawn_nodes(2).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    b.join(&invite(a, Role::Editor).await?, SHORT).await?;
    b.put("notes", &todo(), "/x", json!(1)).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    // demote b: once members reaches b, its own node refuses its writes
    a.set_role("notes", b.device_id(), Role::Viewer).await?;
    wait_for(b, TIMEOUT, || async {
        b.spaces().await.ok().and_then(|s| s[0].role) == Some(Role::Viewer)
    })
    .await?;
    let e = b
        .put("notes", &todo(), "/x", json!(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("viewer"), "{e}");
    // b cannot promote itself: only owners change roles
    assert!(b
        .set_role("notes", b.device_id(), Role::Owner)
        .await
        .is_err());
    // the last owner cannot step down or be removed
    let e = a
        .set_role("notes", a.device_id(), Role::Editor)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("last owner"), "{e}");
    let e = a
        .revoke("notes", a.device_id())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("last owner"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_gets_nothing_written_after_and_the_rest_keep_syncing() -> Result<()> {
    let n = spawn_nodes(3).await?;
    let (a, b, c) = (&n[0].node, &n[1].node, &n[2].node);
    a.create_space("notes").await?;
    b.join(&invite(a, Role::Editor).await?, SHORT).await?;
    let c_code = invite(a, Role::Editor).await?;
    c.join(&c_code, SHORT).await?;
    connect(b, c).await?;
    a.put("notes", &todo(), "/before", json!(true)).await?;
    c.put("notes", &todo(), "/by_c_before", json!(true)).await?;
    wait_converged(&[a, b, c], "notes", "todo").await?;

    let r = a.revoke("notes", c.device_id()).await?;
    assert_eq!(r.epoch, 1);
    assert!(r.not_rekeyed.is_empty(), "{:?}", r.not_rekeyed);
    // b learns the new key from members (sealed to its x25519 key)
    wait_for(b, TIMEOUT, || async {
        b.spaces().await.ok().map(|s| s[0].epoch) == Some(1)
    })
    .await?;
    a.put("notes", &todo(), "/after_a", json!(1)).await?;
    b.put("notes", &todo(), "/after_b", json!(2)).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    let j = a.get("notes", &todo()).await?;
    assert_eq!(
        (j["after_a"].clone(), j["after_b"].clone()),
        (json!(1), json!(2))
    );
    // c is refused: it never sees what was written after, and cannot read
    // the new epoch (bounded wait: several anti-entropy rounds)
    let leaked = wait_for(c, Duration::from_secs(4), || async {
        c.get("notes", &todo())
            .await
            .map(|j| !j["after_a"].is_null() || !j["after_b"].is_null())
            .unwrap_or(false)
    })
    .await;
    assert!(
        leaked.is_err(),
        "the revoked device received a later change"
    );
    assert_eq!(c.spaces().await?[0].epoch, 0);
    // c's own writes (it may not know it was removed) go nowhere
    c.put("notes", &todo(), "/from_c", json!(3)).await?;
    let got = wait_for(a, Duration::from_secs(3), || async {
        a.get("notes", &todo())
            .await
            .map(|j| !j["from_c"].is_null())
            .unwrap_or(false)
    })
    .await;
    assert!(got.is_err(), "a accepted a change from the revoked device");
    assert!(a
        .members("notes")
        .await?
        .iter()
        .all(|m| m.device != c.device_id().to_string()));

    // a device that joins later still gets the history c wrote before it
    // was removed (c's past changes stay valid)
    let d = TestNode::spawn("d").await?;
    d.node.join(&invite(a, Role::Editor).await?, SHORT).await?;
    wait_converged(&[a, &d.node], "notes", "todo").await?;
    assert_eq!(
        d.node.get("notes", &todo()).await?["by_c_before"],
        json!(true)
    );

    // c, on a fresh home with the same device key, redeems its old code to
    // fetch the new epoch key: refused.
    n[2].stop().await;
    let fresh = n[2].dir.path().join("again");
    std::fs::create_dir_all(&fresh)?;
    for f in ["identity.key", "x25519.key", "api-token", "config.toml"] {
        std::fs::copy(n[2].home.dir().join(f), fresh.join(f))?;
    }
    let again = shoal_node::Node::start(
        &shoal_node::Home::at(&fresh),
        shoal_node::NodeConfig::for_tests("again"),
    )
    .await?;
    let e = again.join(&c_code, SHORT).await.unwrap_err().to_string();
    assert!(e.contains("already been used"), "{e}");
    assert!(again.spaces().await?.is_empty());
    Ok(())
}
