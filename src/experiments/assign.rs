//! Deterministic arm assignment.
//!
//! A caller's arm is `weights`-proportional in the 64-bit hash of the experiment name and the
//! sticky key: FNV-1a over both (each followed by a `0xff` separator, which no UTF-8 text
//! contains), then the SplitMix64 finalizer so that similar keys spread over the whole range,
//! then a multiply-shift onto `[0, total weight)`. Nothing depends on the process, the
//! platform or the Rust release, so every replica and every restart agrees.

/// The stable 64-bit hash of an experiment name and a sticky key.
pub fn hash(experiment: &str, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [experiment, key] {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    // SplitMix64's finalizer.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The index of the arm that `point` (uniform over `u64`) falls in, by weight; `None` when
/// every weight is 0.
pub fn pick(weights: &[u32], point: u64) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let target = u64::try_from((u128::from(point) * u128::from(total)) >> 64).unwrap_or(0);
    let mut acc = 0u64;
    weights.iter().position(|w| {
        acc += u64::from(*w);
        target < acc
    })
}

/// The arm of a caller: sticky by `key` when there is one, otherwise at random.
pub fn assign(experiment: &str, key: Option<&str>, weights: &[u32]) -> Option<usize> {
    let point = match key {
        Some(key) => hash(experiment, key),
        None => fastrand::u64(..),
    };
    pick(weights, point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_key_gets_the_same_arm() {
        for user in ["alice", "bob", "", "user-17"] {
            let first = assign("exp", Some(user), &[1, 1]);
            for _ in 0..10 {
                assert_eq!(assign("exp", Some(user), &[1, 1]), first);
            }
        }
        // Pinned (computed by an independent implementation): a change of the hash would move
        // every caller to another arm.
        assert_eq!(hash("exp", "alice"), hash("exp", "alice"));
        assert_ne!(hash("exp", "alice"), hash("exp2", "alice"));
        assert_ne!(hash("ab", "c"), hash("a", "bc"));
        assert_eq!(hash("checkout", "user-1"), 0x654c_6041_2223_a255);
    }

    #[test]
    fn assignment_is_balanced_within_three_sigma() {
        for weights in [[1u32, 1, 0], [1, 1, 1], [9, 1, 0], [3, 2, 5]] {
            let n = 2000u32;
            let mut counts = [0u32; 3];
            for i in 0..n {
                let arm = assign("balance", Some(&format!("user-{i}")), &weights).unwrap();
                counts[arm] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (arm, &count) in counts.iter().enumerate() {
                let p = f64::from(weights[arm]) / f64::from(total);
                let expected = f64::from(n) * p;
                let sigma = (f64::from(n) * p * (1.0 - p)).sqrt();
                assert!(
                    (f64::from(count) - expected).abs() <= 3.0 * sigma,
                    "weights {weights:?}: arm {arm} got {count}, expected {expected:.0} ± {:.0}",
                    3.0 * sigma
                );
            }
        }
    }

    #[test]
    fn weights_of_zero_get_nobody() {
        assert_eq!(pick(&[0, 0], 5), None);
        assert_eq!(pick(&[0, 3], 0), Some(1));
        assert_eq!(pick(&[0, 3], u64::MAX), Some(1));
        assert_eq!(pick(&[1, 1], u64::MAX), Some(1));
        assert_eq!(pick(&[1, 1], 0), Some(0));
    }
}
