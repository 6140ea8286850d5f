//! Convergence under an unreliable network: random edits on several peers,
//! their changes delivered reordered, duplicated and dropped, then the
//! Automerge sync protocol (as shoal runs it, with every message passing
//! through the same decode-and-check path) until quiet. Every peer must end
//! with the same heads and the same JSON.

use automerge::sync::{self, SyncDoc};
use automerge::{AutoCommit, Change};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use shoal_protocol::actor::actor_for;
use shoal_protocol::doc::{put_json, to_json};
use shoal_protocol::sync::{changes_in, decode_message};
use shoal_protocol::DeviceId;

const MAX_ROUNDS: usize = 50;

fn peer(i: usize) -> AutoCommit {
    let dev = DeviceId::from_bytes(vec![i as u8 + 1; 38]).unwrap_or_else(|_| unreachable!());
    AutoCommit::new().with_actor(actor_for(&dev, [i as u8; 8]))
}

/// One sync exchange between a and b until neither has anything to say.
fn sync_pair(a: &mut AutoCommit, b: &mut AutoCommit) -> usize {
    let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
    for round in 0..MAX_ROUNDS {
        let mut quiet = true;
        if let Some(m) = a.sync().generate_sync_message(&mut sa) {
            quiet = false;
            let bytes = m.encode();
            let m = decode_message(&bytes).expect("our own message decodes");
            changes_in(&m).expect("our own changes parse");
            b.sync().receive_sync_message(&mut sb, m).expect("receive");
        }
        if let Some(m) = b.sync().generate_sync_message(&mut sb) {
            quiet = false;
            let m = decode_message(&m.encode()).expect("decodes");
            a.sync().receive_sync_message(&mut sa, m).expect("receive");
        }
        if quiet {
            return round;
        }
    }
    panic!("sync did not go quiet in {MAX_ROUNDS} rounds");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn peers_converge_despite_reorder_duplicate_and_drop(
        n in 2usize..5,
        ops in proptest::collection::vec((0usize..4, 0u8..6, any::<i32>()), 1..60),
        seed in any::<u64>(),
        drop_pct in 0u32..60,
        dup_pct in 0u32..30,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut docs: Vec<AutoCommit> = (0..n).map(peer).collect();
        // in-flight gossip: (to, change)
        let mut wire: Vec<(usize, Change)> = Vec::new();
        for (who, key, val) in ops {
            let who = who % n;
            put_json(&mut docs[who], &format!("/k{key}"), &json!(val)).expect("put");
            docs[who].commit();
            let c = docs[who].get_last_local_change().expect("a change");
            for to in (0..n).filter(|t| *t != who) {
                if rng.gen_range(0..100) >= drop_pct {
                    wire.push((to, c.clone()));
                    if rng.gen_range(0..100) < dup_pct {
                        wire.push((to, c.clone()));
                    }
                }
            }
            // deliver a random part of what is in flight, in random order
            let k = rng.gen_range(0..=wire.len());
            for _ in 0..k {
                let i = rng.gen_range(0..wire.len());
                let (to, c) = wire.swap_remove(i);
                docs[to].apply_changes([c]).expect("apply");
            }
        }
        for (to, c) in wire.drain(..) {
            if rng.gen_bool(0.5) {
                docs[to].apply_changes([c]).expect("apply");
            }
        }
        // anti-entropy: sync along a ring, twice around
        for _ in 0..2 {
            for i in 0..n {
                let j = (i + 1) % n;
                let (lo, hi) = if i < j { (i, j) } else { (j, i) };
                let (left, right) = docs.split_at_mut(hi);
                sync_pair(&mut left[lo], &mut right[0]);
            }
        }
        let heads: Vec<_> = docs.iter_mut().map(|d| { let mut h = d.get_heads(); h.sort(); h }).collect();
        let jsons: Vec<_> = docs.iter().map(to_json).collect();
        for i in 1..n {
            prop_assert_eq!(&heads[0], &heads[i]);
            prop_assert_eq!(&jsons[0], &jsons[i]);
        }
        prop_assert!(docs.iter_mut().all(|d| d.get_missing_deps(&[]).is_empty()));
    }
}
