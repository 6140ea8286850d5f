//! Which kept old versions to drop: by age and by a byte budget, thinned
//! the way staggered versioning does (everything for a while, then one per
//! hour, one per day, one per week), and never because a path churned.
//!
//! Pure: the caller lists what it keeps and the time; [`to_drop`] answers.

use std::collections::{BTreeMap, HashSet};

/// How old versions are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Every version younger than this is kept (ms).
    pub keep_all_ms: i64,
    /// Then, up to each age (ms), one version per interval (ms) per path
    /// (the oldest of the interval), finest first. Past the last age the
    /// last interval applies.
    pub tiers: Vec<(i64, i64)>,
    /// Versions older than this go (ms); `None`: never by age.
    pub max_age_ms: Option<i64>,
    /// Most bytes all kept versions of a folder may hold; `None`: no cap.
    pub max_bytes: Option<u64>,
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

impl Policy {
    /// Everything for a day, then one per hour for a week, one per day
    /// for a month, one per week after that, up to `max_age_days` and
    /// `max_bytes`.
    pub fn staggered(max_age_days: Option<u64>, max_bytes: Option<u64>) -> Self {
        Self {
            keep_all_ms: DAY,
            tiers: vec![(7 * DAY, HOUR), (30 * DAY, DAY), (i64::MAX, 7 * DAY)],
            max_age_ms: max_age_days.map(|d| (d as i64).saturating_mul(DAY)),
            max_bytes,
        }
    }

    /// The interval a version of this age is thinned to (`None`: kept).
    fn interval(&self, age_ms: i64) -> Option<i64> {
        if age_ms < self.keep_all_ms {
            return None;
        }
        self.tiers
            .iter()
            .find(|(until, _)| age_ms < *until)
            .or(self.tiers.last())
            .map(|(_, every)| (*every).max(1))
    }
}

/// One kept version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The caller's id for it.
    pub id: u64,
    /// The path it was a version of.
    pub path: String,
    /// When it was kept (ms since the epoch).
    pub at_ms: i64,
    /// Its size.
    pub size: u64,
}

/// The ids of the versions `policy` drops at `now_ms`.
///
/// Over the byte budget, versions go in this order, oldest first within
/// each step, until the rest fits: those between a path's oldest and its
/// newest kept version; then the newest of paths that keep two or more;
/// then the last one left of each path. So a writer who churns every file
/// many times pushes out its own intermediate versions before the originals.
pub fn to_drop(items: &[Kept], now_ms: i64, policy: &Policy) -> Vec<u64> {
    let mut gone: HashSet<u64> = HashSet::new();
    // Per path, oldest first (ties by id, so the answer ignores order).
    let mut by_path: BTreeMap<&str, Vec<&Kept>> = BTreeMap::new();
    for k in items {
        by_path.entry(k.path.as_str()).or_default().push(k);
    }
    for list in by_path.values_mut() {
        list.sort_by_key(|k| (k.at_ms, k.id));
        let mut last_bucket: Option<(i64, i64)> = None;
        for k in list.iter() {
            let age = now_ms.saturating_sub(k.at_ms).max(0);
            if policy.max_age_ms.is_some_and(|m| age > m) {
                gone.insert(k.id);
                continue;
            }
            let Some(every) = policy.interval(age) else {
                continue;
            };
            let bucket = (every, k.at_ms.div_euclid(every));
            if last_bucket == Some(bucket) {
                gone.insert(k.id);
            } else {
                last_bucket = Some(bucket);
            }
        }
    }
    if let Some(budget) = policy.max_bytes {
        let mut total: u64 = items
            .iter()
            .filter(|k| !gone.contains(&k.id))
            .map(|k| k.size)
            .sum();
        // (step, at, id) of every survivor, in the order they would go.
        let mut order: Vec<(u8, i64, u64, u64)> = Vec::new();
        for list in by_path.values() {
            let left: Vec<&&Kept> = list.iter().filter(|k| !gone.contains(&k.id)).collect();
            let n = left.len();
            for (i, k) in left.iter().enumerate() {
                let step = if n == 1 || i == 0 {
                    2
                } else if i == n - 1 {
                    1
                } else {
                    0
                };
                order.push((step, k.at_ms, k.id, k.size));
            }
        }
        order.sort();
        for (_, _, id, size) in order {
            if total <= budget {
                break;
            }
            gone.insert(id);
            total -= size;
        }
    }
    let mut out: Vec<u64> = gone.into_iter().collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_000 * DAY;

    fn k(id: u64, path: &str, age_ms: i64, size: u64) -> Kept {
        Kept {
            id,
            path: path.into(),
            at_ms: NOW - age_ms,
            size,
        }
    }

    #[test]
    fn everything_younger_than_a_day_is_kept_however_many() {
        let items: Vec<Kept> = (0..500).map(|i| k(i, "a", i as i64 * 1000, 1)).collect();
        assert!(to_drop(&items, NOW, &Policy::staggered(Some(365), None)).is_empty());
    }

    #[test]
    fn older_versions_thin_to_one_per_hour_then_day_keeping_the_oldest() {
        // Three versions in one hour two days ago: the oldest stays.
        let base = 2 * DAY + HOUR / 2;
        let items = vec![
            k(1, "a", base, 1),
            k(2, "a", base - 60_000, 1),
            k(3, "a", base - 120_000, 1),
        ];
        let p = Policy::staggered(None, None);
        let hour_of = |id: u64| items[id as usize - 1].at_ms.div_euclid(HOUR);
        let mut expect: Vec<u64> = vec![2, 3];
        expect.retain(|id| hour_of(*id) == hour_of(1));
        assert_eq!(to_drop(&items, NOW, &p), expect);
        // Two versions on one day ten days ago: one stays.
        let items = vec![k(1, "b", 10 * DAY + 3 * HOUR, 1), k(2, "b", 10 * DAY, 1)];
        let same_day = items[0].at_ms.div_euclid(DAY) == items[1].at_ms.div_euclid(DAY);
        assert_eq!(
            to_drop(&items, NOW, &p),
            if same_day { vec![2] } else { vec![] }
        );
    }

    #[test]
    fn age_drops_what_is_older_than_the_limit() {
        let items = vec![k(1, "a", 31 * DAY, 1), k(2, "a", 29 * DAY, 1)];
        assert_eq!(
            to_drop(&items, NOW, &Policy::staggered(Some(30), None)),
            vec![1]
        );
    }

    #[test]
    fn over_budget_a_churning_writer_loses_its_own_versions_first() {
        // Ten originals of 10 bytes, then twenty versions of each.
        let mut items = Vec::new();
        let mut id = 0;
        for f in 0..10 {
            id += 1;
            items.push(k(id, &format!("f{f}"), 3 * HOUR, 10));
            for v in 0..20 {
                id += 1;
                items.push(k(id, &format!("f{f}"), HOUR - v * 1000, 10));
            }
        }
        let p = Policy::staggered(None, Some(300));
        let gone: HashSet<u64> = to_drop(&items, NOW, &p).into_iter().collect();
        let left: u64 = items
            .iter()
            .filter(|i| !gone.contains(&i.id))
            .map(|i| i.size)
            .sum();
        assert!(left <= 300);
        for i in items.iter().filter(|i| i.at_ms == NOW - 3 * HOUR) {
            assert!(!gone.contains(&i.id), "original {} dropped", i.path);
        }
    }

    fn arb_items() -> impl Strategy<Value = Vec<Kept>> {
        proptest::collection::vec((0u8..4, 0i64..(60 * DAY), 0u64..1000), 0..40).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (p, age, size))| k(i as u64, &format!("p{p}"), age, size))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn the_answer_ignores_order_and_fits_the_budget(
            items in arb_items(),
            budget in proptest::option::of(0u64..20_000),
            days in proptest::option::of(1u64..90),
            seed in any::<u64>(),
        ) {
            let p = Policy::staggered(days, budget);
            let a = to_drop(&items, NOW, &p);
            let mut shuffled = items.clone();
            let n = shuffled.len();
            for i in 0..n {
                shuffled.swap(i, (seed.wrapping_mul(i as u64 + 7) % n as u64) as usize);
            }
            prop_assert_eq!(&a, &to_drop(&shuffled, NOW, &p));
            let gone: HashSet<u64> = a.iter().copied().collect();
            let left: u64 = items.iter().filter(|i| !gone.contains(&i.id)).map(|i| i.size).sum();
            if let Some(b) = budget {
                prop_assert!(left <= b);
            }
            // Nothing younger than a day goes, unless the budget needs it.
            if budget.is_none() {
                for i in &items {
                    if NOW - i.at_ms < DAY {
                        prop_assert!(!gone.contains(&i.id));
                    }
                }
            }
        }

        #[test]
        fn more_versions_of_one_path_never_push_out_another_paths_versions(
            items in arb_items(),
            extra in 1usize..30,
        ) {
            // No budget: what another path keeps does not depend on how
            // often this one changed.
            let p = Policy::staggered(Some(365), None);
            let before: HashSet<u64> = to_drop(&items, NOW, &p).into_iter().collect();
            let mut more = items.clone();
            for j in 0..extra {
                more.push(k(10_000 + j as u64, "churn", (j as i64) * 1000, 1));
            }
            let after: HashSet<u64> = to_drop(&more, NOW, &p).into_iter().collect();
            for i in &items {
                prop_assert_eq!(before.contains(&i.id), after.contains(&i.id));
            }
        }
    }
}
