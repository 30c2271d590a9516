//! Retry delays: capped exponential backoff with "equal jitter", shared by every client that
//! retries (certificate issuance, xDS reconnects) so they all back off the same way.

use std::time::Duration;

use rand::Rng;

/// A backoff schedule from `min` doubling up to `max`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Delay ceiling after the first failure.
    pub min: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures: uniformly between half and all of
    /// `min * 2^(failures-1)`, capped at `max`.
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        let ceiling = self.min.saturating_mul(1 << doublings).min(self.max);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_up_to_the_cap() {
        let b = Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(30),
        };
        for (failures, ceiling) in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (100, 30.0)] {
            for _ in 0..50 {
                let d = b.delay(failures).as_secs_f64();
                assert!(d >= ceiling / 2.0 && d <= ceiling, "{failures}: {d}");
            }
        }
    }
}
