//! Where a task lives: rendezvous (highest-random-weight) hashing of the
//! task's key over the roster. Every node computes the same answer from the
//! same roster; when a member joins or leaves, only the keys whose top N
//! included it move (about 1/N of them), the consistent-hashing property.

/// The nodes holding `key`, best first: `replicas` of them, or every
/// member when there are fewer.
pub fn place(key: &str, members: &[u64], replicas: usize) -> Vec<u64> {
    let mut scored: Vec<(u64, u64)> = members.iter().map(|&m| (score(key, m), m)).collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().take(replicas).map(|(_, m)| m).collect()
}

/// A 64-bit FNV-1a of the key mixed with the member id through a
/// SplitMix64 finalizer: cheap, stable across builds and platforms.
fn score(key: &str, member: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h ^ member.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        (0..10_000).map(|i| format!("task-{i}")).collect()
    }

    #[test]
    fn distinct_nodes_and_deterministic() {
        let members = [11, 22, 33, 44];
        for k in keys().iter().take(100) {
            let p = place(k, &members, 2);
            assert_eq!(p.len(), 2);
            assert_ne!(p[0], p[1]);
            assert_eq!(
                p,
                place(k, &[44, 33, 22, 11], 2),
                "order of the roster must not matter"
            );
        }
        assert_eq!(place("x", &[5], 3), vec![5]);
        assert!(place("x", &[], 2).is_empty());
    }

    #[test]
    fn balanced_and_only_about_one_nth_moves() {
        let before = [1u64, 2, 3];
        let after = [1u64, 2, 3, 4];
        let ks = keys();
        let mut load = [0usize; 3];
        let mut moved = 0;
        for k in &ks {
            let a = place(k, &before, 1)[0];
            load[(a - 1) as usize] += 1;
            if place(k, &after, 1)[0] != a {
                moved += 1;
            }
        }
        for l in load {
            assert!((2_900..3_800).contains(&l), "unbalanced: {load:?}");
        }
        // A 4th node should take about a quarter of the keys, and only those.
        let share = moved as f64 / ks.len() as f64;
        assert!((0.2..0.3).contains(&share), "{share}");
        // Removing a node moves only the keys it held.
        let mut moved_on_leave = 0;
        for k in &ks {
            let a = place(k, &before, 2);
            let b = place(k, &[1, 3], 2);
            if !a.contains(&2) {
                assert_eq!(a, b, "a key not on node 2 moved");
            } else {
                moved_on_leave += 1;
            }
        }
        assert!(moved_on_leave > 0);
    }
}
