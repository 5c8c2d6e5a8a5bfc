//! A small mutation fuzzer for the project's parsers: it starts from valid inputs, mutates them
//! (bit flips, interesting bytes, inserted, deleted and repeated ranges, splices of two
//! inputs, truncations) and hands each case to a check that must not panic. A check may also
//! assert properties (a round trip, a bound).
//!
//! `cargo xtask test` runs every target for [`QUICK_CASES`] cases; `cargo xtask fuzz --seconds
//! N` sets `KROWOC_FUZZ_SECONDS` and each target runs that long. The generator's seed is
//! printed with a failing case (`KROWOC_FUZZ_SEED` replays it), and the case itself in hex, to
//! be kept as a regression test.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// Cases per target in a normal test run.
pub const QUICK_CASES: u64 = 3_000;

/// Bytes that break parsers more often than others: delimiters, signs, lengths' edges.
const INTERESTING: &[u8] = b"\r\n\0\xff*$:+-=,;?#%{}[]\"\\ 019";

/// How long a target runs: `KROWOC_FUZZ_SECONDS`, or [`QUICK_CASES`] cases.
enum Budget {
    Cases(u64),
    Until(Instant),
}

impl Budget {
    fn from_env() -> Budget {
        match std::env::var("KROWOC_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(s) => Budget::Until(Instant::now() + Duration::from_secs(s)),
            None => Budget::Cases(QUICK_CASES),
        }
    }

    fn more(&self, done: u64) -> bool {
        match self {
            Budget::Cases(n) => done < *n,
            Budget::Until(t) => Instant::now() < *t,
        }
    }
}

/// Runs `check` on mutations of `seeds` (and on the seeds themselves) within the budget;
/// fails the calling test with the seed and the case when `check` panics. Returns the number
/// of cases run.
pub fn fuzz(target: &str, seeds: &[&[u8]], mut check: impl FnMut(&[u8])) -> u64 {
    assert!(!seeds.is_empty(), "{target}: give at least one seed input");
    let seed = std::env::var("KROWOC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let budget = Budget::from_env();
    let mut run = |case: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| check(case))).is_err() {
            panic!(
                "fuzz target {target} failed (KROWOC_FUZZ_SEED={seed}) on {} bytes: {}",
                case.len(),
                hex(case)
            );
        }
    };
    for s in seeds {
        run(s);
    }
    let mut done = 0;
    while budget.more(done) {
        let base = seeds[rng.usize(..seeds.len())];
        let other = seeds[rng.usize(..seeds.len())];
        let mut case = base.to_vec();
        for _ in 0..rng.usize(1..=4) {
            mutate(&mut rng, &mut case, other);
        }
        run(&case);
        done += 1;
    }
    done
}

fn mutate(rng: &mut fastrand::Rng, case: &mut Vec<u8>, other: &[u8]) {
    let at = |rng: &mut fastrand::Rng, len: usize| rng.usize(..=len);
    match rng.u8(..7) {
        0 if !case.is_empty() => {
            let i = rng.usize(..case.len());
            case[i] ^= 1 << rng.u8(..8);
        }
        1 if !case.is_empty() => {
            let i = rng.usize(..case.len());
            case[i] = INTERESTING[rng.usize(..INTERESTING.len())];
        }
        2 => {
            let i = at(rng, case.len());
            let b = INTERESTING[rng.usize(..INTERESTING.len())];
            case.insert(i, b);
        }
        3 if !case.is_empty() => {
            let i = rng.usize(..case.len());
            let n = rng.usize(1..=(case.len() - i).min(16));
            case.drain(i..i + n);
        }
        4 if !case.is_empty() => {
            // Repeat a range: long lists, deep nesting, repeated fields.
            let i = rng.usize(..case.len());
            let n = rng.usize(1..=(case.len() - i).min(64));
            let piece = case[i..i + n].to_vec();
            let times = rng.usize(1..=8);
            let j = at(rng, case.len());
            for _ in 0..times {
                case.splice(j..j, piece.iter().copied());
            }
        }
        5 if !other.is_empty() => {
            let i = at(rng, case.len());
            let from = rng.usize(..other.len());
            let n = rng.usize(1..=other.len() - from);
            case.truncate(i);
            case.extend_from_slice(&other[from..from + n]);
        }
        _ => {
            let n = at(rng, case.len());
            case.truncate(n);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_check_fails_with_its_case() {
        let outcome = catch_unwind(|| {
            fuzz("demo", &[b"ok"], |case| assert!(!case.contains(&b'\n')));
        });
        let message = outcome.expect_err("a newline comes up");
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            text.contains("fuzz target demo failed (KROWOC_FUZZ_SEED="),
            "{text}"
        );
    }

    #[test]
    fn mutations_reach_many_distinct_cases() {
        let mut seen = std::collections::HashSet::new();
        let n = fuzz("demo", &[b"*1\r\n$4\r\nPING\r\n"], |case| {
            seen.insert(case.to_vec());
        });
        assert!(n >= QUICK_CASES.min(1_000) || std::env::var("KROWOC_FUZZ_SECONDS").is_ok());
        assert!(seen.len() > 500, "{} distinct cases", seen.len());
    }
}
