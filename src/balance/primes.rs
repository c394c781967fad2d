//! Prime numbers for Maglev table sizes. Sizes are at most a few tens of millions, so trial
//! division is fast enough (a few thousand divisions) and obviously correct.

/// Whether `n` is prime.
pub(super) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut divisor = 3u64;
    while divisor.saturating_mul(divisor) <= n {
        if n.is_multiple_of(divisor) {
            return false;
        }
        divisor += 2;
    }
    true
}

/// The smallest prime `>= n` (2 for anything below 2).
pub(super) fn next_prime_at_least(n: u64) -> u64 {
    let mut candidate = n.max(2);
    // Primes are dense (gaps below 2^32 are under 400), so this ends quickly; the bound only
    // keeps it obviously finite.
    while !is_prime(candidate) && candidate < u64::MAX {
        candidate += 1;
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_primes() {
        let primes: Vec<u64> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    }

    #[test]
    fn next_prime() {
        assert_eq!(next_prime_at_least(0), 2);
        assert_eq!(next_prime_at_least(65537), 65537);
        assert_eq!(next_prime_at_least(65538), 65539);
        assert_eq!(next_prime_at_least(100_001), 100_003);
    }
}
