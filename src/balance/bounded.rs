//! The load cap of consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam),
//! as HAProxy exposes it with `hash-balance-factor`:
//!
//! > <factor> is the control for the maximum number of concurrent requests to send to a
//! > server, expressed as a percentage of the average number of concurrent requests across
//! > all of the active servers. [...] if <factor> is 150, then no server will be allowed to
//! > have a load more than 1.5 times the average. If server weights are used, they will be
//! > respected. Setting <factor> to 0 (the default) disables the feature.
//!
//! The exact rule used here, over the usable backends of the tier being walked, with
//! `T` = their total load (active flows), `W` = their total weight, and the new flow counted:
//!
//! ```text
//! cap(i)      = ceil(factor_pct * (T + 1) * weight(i) / (100 * W))
//! eligible(i) = load(i) + 1 <= cap(i)
//! ```
//!
//! HAProxy's code (`chash_server_is_eligible`) first rounds the total,
//! `ceil((T + 1) * factor / 100)`, then hands out whole slots per weight unit and spreads the
//! remainder by each server's cumulative weight in its tree order. That spreading depends on
//! server order, which Ringway must not; rounding each backend's share up instead is
//! order-independent and at most one flow more lenient per backend. Like HAProxy, factors
//! below 100 are not meaningful (the caps could not hold all flows); they are raised to 100.
//!
//! Because the caps add up to at least `T + 1`, some usable backend is always eligible, so a
//! flow is never refused for load alone.

/// Caps for one lookup, from the totals of the tier's usable backends.
pub(super) struct LoadBound {
    /// factor_pct * (T + 1), the numerator shared by every backend's cap.
    scaled_total: u128,
    /// 100 * W
    scaled_weight: u128,
}

impl LoadBound {
    /// `total_weight` must be > 0 (there is at least one usable backend).
    pub(super) fn new(factor_pct: u32, total_load: u64, total_weight: u64) -> LoadBound {
        let factor = u128::from(factor_pct.max(100));
        LoadBound {
            scaled_total: factor * (u128::from(total_load) + 1),
            scaled_weight: 100 * u128::from(total_weight.max(1)),
        }
    }

    /// The most flows a backend of this weight may carry, the new one included.
    pub(super) fn cap(&self, weight: u32) -> u64 {
        let numerator = self.scaled_total * u128::from(weight);
        let cap = numerator.div_ceil(self.scaled_weight);
        u64::try_from(cap).unwrap_or(u64::MAX)
    }

    /// Whether a backend at `load` may take one more flow.
    pub(super) fn admits(&self, load: u64, weight: u32) -> bool {
        load < self.cap(weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_is_factor_times_average_rounded_up() {
        // 10 equal backends carrying 99 flows; the 100th arrives. Average 10, factor 1.25.
        let bound = LoadBound::new(125, 99, 10);
        assert_eq!(bound.cap(1), 13); // ceil(12.5)
        assert!(bound.admits(12, 1));
        assert!(!bound.admits(13, 1));
    }

    #[test]
    fn cap_respects_weights() {
        // Weights 1 and 3, 7 flows, the 8th arrives: averages 2 and 6, factor 1.5 -> 3 and 9.
        let bound = LoadBound::new(150, 7, 4);
        assert_eq!(bound.cap(1), 3);
        assert_eq!(bound.cap(3), 9);
    }

    #[test]
    fn first_flow_is_always_admitted() {
        let bound = LoadBound::new(100, 0, 1000);
        assert_eq!(bound.cap(1), 1);
    }

    #[test]
    fn low_factors_act_as_100_and_extremes_do_not_overflow() {
        let bound = LoadBound::new(1, 9, 10);
        assert_eq!(bound.cap(1), 1);
        let huge = LoadBound::new(u32::MAX, u64::MAX, 1);
        assert_eq!(huge.cap(u32::MAX), u64::MAX);
    }
}
