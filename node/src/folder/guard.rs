//! The mass-delete guard: when one device's changes would delete or
//! overwrite more of this folder at once than the settings allow, this
//! device holds that device's deletions and overwrites (its files stay as
//! they are) until the user accepts them or restores.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Instant;

use shoal_protocol::DeviceId;

pub use crate::config::GuardSettings;

/// What the guard knows: recent destructive changes per device, what it
/// holds, and what the user accepted.
#[derive(Debug, Default)]
pub struct MassGuard {
    recent: HashMap<DeviceId, VecDeque<Instant>>,
    held: HashMap<DeviceId, BTreeSet<String>>,
    accepted: HashSet<String>,
}

impl MassGuard {
    /// Takes a batch of destructive changes (path, writing device) about to
    /// be applied to a folder of `files_here` files; returns the paths to
    /// hold, and the devices that tripped the guard with this batch.
    pub fn check(
        &mut self,
        changes: &[(String, DeviceId)],
        files_here: usize,
        s: &GuardSettings,
        now: Instant,
    ) -> (HashSet<String>, Vec<DeviceId>) {
        let mut hold = HashSet::new();
        let mut tripped = Vec::new();
        if s.min_files == 0 {
            return (hold, tripped);
        }
        for q in self.recent.values_mut() {
            while q.front().is_some_and(|t| now.duration_since(*t) > s.window) {
                q.pop_front();
            }
        }
        self.recent.retain(|_, q| !q.is_empty());
        let mut by_device: HashMap<&DeviceId, Vec<&String>> = HashMap::new();
        for (path, device) in changes {
            if self.accepted.remove(path) {
                continue;
            }
            by_device.entry(device).or_default().push(path);
        }
        let limit = s
            .min_files
            .max((s.share * files_here as f64).ceil() as usize);
        for (device, paths) in by_device {
            let held = self.held.contains_key(device);
            let recent = self.recent.get(device).map_or(0, VecDeque::len);
            if held || recent + paths.len() > limit {
                if !held {
                    tripped.push(device.clone());
                }
                let set = self.held.entry(device.clone()).or_default();
                for p in paths {
                    set.insert(p.clone());
                    hold.insert(p.clone());
                }
            } else {
                self.recent
                    .entry(device.clone())
                    .or_default()
                    .extend(std::iter::repeat_n(now, paths.len()));
            }
        }
        (hold, tripped)
    }

    /// The user confirmed: everything held is applied, without counting.
    /// Returns how many paths that releases.
    pub fn accept(&mut self) -> usize {
        let mut n = 0;
        for (device, paths) in self.held.drain() {
            self.recent.remove(&device);
            n += paths.len();
            self.accepted.extend(paths);
        }
        n
    }

    /// Devices held, with how many of their changes wait.
    pub fn held(&self) -> Vec<(DeviceId, usize)> {
        let mut v: Vec<(DeviceId, usize)> = self
            .held
            .iter()
            .map(|(d, p)| (d.clone(), p.len()))
            .collect();
        v.sort_by_key(|a| a.0.to_string());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dev(b: u8) -> DeviceId {
        DeviceId::from_bytes(vec![b; 38]).unwrap()
    }

    fn batch(d: &DeviceId, from: usize, n: usize) -> Vec<(String, DeviceId)> {
        (from..from + n)
            .map(|i| (format!("f{i}"), d.clone()))
            .collect()
    }

    #[test]
    fn half_of_the_folder_and_at_least_the_minimum_trips_it() {
        let s = GuardSettings::default();
        let (a, b) = (dev(1), dev(2));
        let t = Instant::now();
        let mut g = MassGuard::default();
        // 100 of 1000 files: under half.
        let (hold, tripped) = g.check(&batch(&a, 0, 100), 1000, &s, t);
        assert!(hold.is_empty() && tripped.is_empty());
        // 150 of 200: the limit is max(100, half of 200) = 100: held.
        let mut g = MassGuard::default();
        let (hold, tripped) = g.check(&batch(&a, 0, 150), 200, &s, t);
        assert_eq!(hold.len(), 150);
        assert_eq!(tripped, vec![a.clone()]);
        // Another device is not held for it.
        let (hold, _) = g.check(&batch(&b, 500, 3), 200, &s, t);
        assert!(hold.is_empty());
        // The held device's next change is held too, until accepted.
        let (hold, tripped) = g.check(&batch(&a, 900, 1), 200, &s, t);
        assert_eq!(hold.len(), 1);
        assert!(tripped.is_empty());
        assert_eq!(g.held(), vec![(a.clone(), 151)]);
        assert_eq!(g.accept(), 151);
        let (hold, _) = g.check(&batch(&a, 0, 150), 200, &s, t);
        assert!(hold.is_empty(), "accepted changes are applied");
        assert!(g.held().is_empty());
    }

    #[test]
    fn changes_spread_over_the_window_add_up_and_age_out() {
        let s = GuardSettings::default();
        let a = dev(1);
        let t = Instant::now();
        let mut g = MassGuard::default();
        for k in 0..10 {
            let (hold, _) = g.check(&batch(&a, k * 10, 10), 100, &s, t);
            assert!(hold.is_empty());
        }
        let (hold, tripped) = g.check(&batch(&a, 100, 1), 100, &s, t);
        assert_eq!((hold.len(), tripped.len()), (1, 1));
        let mut g = MassGuard::default();
        g.check(&batch(&a, 0, 100), 100, &s, t);
        let later = t + s.window + Duration::from_secs(1);
        let (hold, _) = g.check(&batch(&a, 100, 100), 100, &s, later);
        assert!(hold.is_empty(), "the first hundred aged out");
    }

    #[test]
    fn a_minimum_of_zero_turns_it_off() {
        let s = GuardSettings {
            min_files: 0,
            ..Default::default()
        };
        let mut g = MassGuard::default();
        let (hold, _) = g.check(&batch(&dev(1), 0, 10_000), 10, &s, Instant::now());
        assert!(hold.is_empty());
    }
}
